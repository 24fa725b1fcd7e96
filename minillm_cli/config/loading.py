"""Reading recipes: YAML files, `section.key=value` overrides, named flags and the shipped recipes.

`load_recipe()` is the only entry point of a run: it merges defaults < file < overrides < named
flags, validates once (`config.validate`) and returns a `Recipe` plus the provenance of every leaf
value. The shipped recipes and the built-in data are package data (`recipes/`).

This module must stay light: it is imported by the CLI, which must not import torch.
"""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from minillm_cli.config.schema import Recipe
from minillm_cli.config.validation import validate
from minillm_cli.errors import UserError

# Shipped recipes, accelerate configs and built-in data, installed with the package. A real
# directory, not just a Traversable: data paths inside recipes and accelerate config files are
# handed to other programs (datasets, the launcher). Wheels install unzipped, so this holds.
RECIPES_DIR = Path(str(files("minillm_cli.recipes")))


# ----------------------------------------------------------------------------------- loading
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign `value` at `a.b.c` inside nested dicts, creating levels as needed."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            if isinstance(child, str) and part == "method" and i == 0:
                child = {"name": child}  # `method: kd` shorthand, then `method.kd_ratio=...`
            elif child is not None:
                raise UserError(f"override {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
            else:
                child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        out: list[str] = []
        for k, v in tree.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [prefix]


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=1e-5` -> ("optim.lr", 1e-05). Values are parsed as YAML (safe)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
        raise UserError(f"override '{text}' is not of the form section.key=value")
    try:
        value = load_yaml(raw, f"override {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"override {key}: value '{raw}' is not valid YAML ({e.__class__.__name__})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"override {key}: value '{raw}' is not a finite number")
    return key, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, but a key given twice in one mapping is an error (plain YAML keeps the last
    one silently: a second `method:` section would drop the first without a word)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the constructor below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

MAX_YAML_VALUES = 10_000
"""A recipe or override may hold at most this many YAML values, aliases counted as often as they are
used: a few bytes of nested aliases ("billion laughs") otherwise expand to gigabytes when validated."""


def _expanded_values(node: yaml.Node, limit: int) -> int:
    """How many values `node` holds once every alias is expanded, counting stops past `limit`
    (a recursive alias never ends)."""
    count, stack = 0, [node]
    while stack and count <= limit:
        n = stack.pop()
        count += 1
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend(item for pair in n.value for item in pair)
    return count


def load_yaml(text: str, what: str) -> Any:
    """Parse YAML safely: the safe loader, a key given twice in a mapping refused, and at most
    MAX_YAML_VALUES values after alias expansion.

    Raises:
        yaml.YAMLError: not YAML.
        UserError: too many values (naming `what`).
    """
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise UserError(f"{what}: expands to more than {MAX_YAML_VALUES} YAML values (aliases of aliases, or a "
                            "recursive alias); write the values out")
        try:
            return loader.construct_document(node)
        except ValueError as e:  # e.g. an integer of 200,000 digits (Python's int conversion limit)
            raise UserError(f"{what}: a value YAML cannot hold ({str(e)[:80]})") from None
    finally:
        loader.dispose()


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (safe loader, duplicate keys refused). A name without a path is looked up
    among shipped recipes."""
    p = Path(path)
    try:
        exists = p.exists()
    except (OSError, ValueError):  # e.g. an embedded NUL byte
        raise UserError(f"recipe file not found: {str(path)!r}") from None
    if not exists:
        shipped = find_shipped(str(path))
        if shipped is None:
            raise UserError(f"recipe file not found: {path} (see `minillm recipes` for shipped ones)")
        p = shipped
    try:
        data = load_yaml(p.read_text(encoding="utf-8-sig"), f"recipe {p}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise UserError(f"recipe {p}{where}: invalid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {p}: cannot read ({e})") from None
    except RecursionError:
        raise UserError(f"recipe {p}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Deep-merge recipe `src` into `dst` (a section given as a scalar, like `method: kd`, replaces)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    default_method: str = "minillm",
    base: str | Path | None = None,
) -> tuple[Recipe, dict[str, str]]:
    """Build the run's recipe: defaults < base < file < overrides < named flags.

    Args:
        path: YAML file, a shipped recipe name, or None for defaults only.
        overrides: `section.key=value` strings (values parsed as YAML).
        flags: dotted key -> value from named CLI flags (None values are ignored).
        default_method: method used when neither file nor overrides name one.
        base: the saved recipe of a run being resumed: what the run was started with, so that only
            what the user gives now changes (and is then compared with it by the loop).

    Returns:
        The validated recipe and a map dotted-key -> source ("run", "recipe", "override", "flag")
        for every value that did not come from the defaults.
    """
    tree: dict[str, Any] = {}
    source: dict[str, str] = {}
    if base is not None:
        tree = read_recipe_file(base)
        source = {k: "run" for k in _leaves(tree)}
    base_method = tree["method"].get("name") if isinstance(tree.get("method"), dict) else None
    if path is not None:
        file_tree = read_recipe_file(path)
        _anchor_paths(file_tree, _recipe_location(path))
        source.update({k: "recipe" for k in _leaves(file_tree)})
        if isinstance(file_tree.get("method"), str):
            file_tree["method"] = {"name": file_tree["method"]}
        _merge(tree, file_tree)
    if "method" not in tree:
        tree["method"] = {"name": default_method}
    elif isinstance(tree["method"], str):
        tree["method"] = {"name": tree["method"]}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        source[key] = "override"
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
            source[key] = "flag"
    method = tree.get("method")
    if base_method is not None and isinstance(method, dict) and method.get("name") != base_method:
        # Another method than the saved run's: its settings do not carry over (the loop then
        # refuses the resume, naming method.name).
        tree["method"] = {k: v for k, v in method.items() if source.get(f"method.{k}") != "run"}
    return validate(tree), source


def output_dir_of(path: str | Path | None, overrides: list[str] | None, flags: dict[str, Any] | None) -> str | None:
    """`output.dir` as the user gives it (flag > override > recipe file), read before validation:
    `--resume` needs the run's saved recipe to validate the rest against."""
    if flags and flags.get("output.dir") is not None:
        return str(flags["output.dir"])
    for text in reversed(overrides or []):
        key, value = parse_override(text)
        if key == "output.dir" and value is not None:
            return str(value)
    if path is not None:
        node = read_recipe_file(path).get("output")
        if isinstance(node, dict) and node.get("dir") is not None:
            return str(node["dir"])
    return None


PATH_KEYS = (("data", "train"), ("data", "dev"), ("data", "corpus"), ("data", "teacher_cache"), ("models", "teacher"),
             ("models", "student"))


def _recipe_location(path: str | Path) -> Path:
    p = Path(path)
    return p if p.exists() else (find_shipped(str(path)) or p)


def _anchor_paths(tree: dict[str, Any], recipe_path: Path) -> None:
    """Relative paths written in a recipe file are relative to that file when they exist there
    (so shipped recipes work from any directory); otherwise they stay relative to the CWD."""
    base = recipe_path.resolve().parent
    for section, key in PATH_KEYS:
        node = tree.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(key)
        try:
            if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
                node[key] = str(base / value)
        except (OSError, ValueError):  # not a usable path (e.g. a NUL byte): validation names it later
            continue


def dump_resolved(recipe: Recipe, source: dict[str, str]) -> str:
    """The fully resolved recipe as YAML, each non-default value annotated with where it came from."""
    data = recipe.model_dump(mode="json", by_alias=True)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    lines = []
    path: list[tuple[int, str]] = []  # (indent, key) stack
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        if ":" in stripped and not stripped.startswith("- "):
            key = stripped.split(":", 1)[0]
            while path and path[-1][0] >= indent:
                path.pop()
            path.append((indent, key))
            dotted = ".".join(k for _, k in path)
            origin = source.get(dotted)
            if origin and not stripped.endswith(":"):
                line = f"{line}  # {origin}"
        lines.append(line)
    return "# resolved minillm recipe (values without a comment are defaults)\n" + "\n".join(lines) + "\n"


def shipped_recipes() -> list[Path]:
    """All YAML recipes shipped in the package (recipes/, recursively), sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    skip = {"data", "accelerate"}  # data files and accelerate launch configs are not recipes
    return sorted(p for p in RECIPES_DIR.rglob("*.yaml") if not skip & set(p.relative_to(RECIPES_DIR).parts))


def is_pipeline(path: Path) -> bool:
    """Pipeline recipes (quickstart) have a top-level `pipeline:` key and their own schema."""
    return any(line.startswith("pipeline:") for line in path.read_text(encoding="utf-8").splitlines())


def find_shipped(name: str) -> Path | None:
    """Find a shipped recipe by file name or stem (`quickstart`, `cpu/sft-tiny.yaml`)."""
    for p in shipped_recipes():
        rel = p.relative_to(RECIPES_DIR)
        if name in (p.name, p.stem, str(rel), str(rel.with_suffix(""))):
            return p
    return None
