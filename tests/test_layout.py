"""The house: imports run one way, from the commands down to the building blocks, and no module grows
past a screenful of screens (docs/LAYOUT.md draws it).

Read from the source text, not by importing: an import inside a function counts too (it is a
dependency all the same), and a module under `if TYPE_CHECKING:` counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "minillm_cli"

LAYERS = [
    {"errors", "__init__"},
    {"progress"},
    {"config"},
    {"runs"},
    {"data", "models"},
    {"sampling", "losses"},
    {"parallel"},
    {"methods"},
    {"evaluate"},
    {"train"},
    {"commands", "export"},
    {"cli"},
]
"""Each top-level module or subpackage of minillm_cli, lowest layer first: a module imports only
from its own package and from lower layers."""
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name (without `minillm_cli.`) -> file."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """The minillm_cli modules `path` imports (dotted, without the `minillm_cli.` prefix)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minillm_cli":
            base = node.module.removeprefix("minillm_cli").lstrip(".")
            for alias in node.names:  # `from minillm_cli.data import encoding`: the module is data.encoding
                found.add(f"{base}.{alias.name}".lstrip(".") if base else alias.name)
                if base:
                    found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("minillm_cli.") for a in node.names if a.name.startswith("minillm_cli."))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        assert any(name.split(".")[0] in names for names in LAYERS), f"{name}: add its package to LAYERS"


def test_imports_run_one_way():
    upward = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
              if a.split(".")[0] != b.split(".")[0] and _layer(b) >= _layer(a)]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_layers_can_fail():
    """The checks above see a real upward import (so that they cannot pass vacuously)."""
    assert "train.loop" in _graph()["commands.train"]  # an import inside a function counts
    assert _layer("commands.train") > _layer("train.loop") > _layer("methods.minillm") > _layer("losses.logprobs")
