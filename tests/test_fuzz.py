"""Malformed input never ends in a traceback: recipes, override lists and data rows, generated.

Each property runs a fixed number of seeded cases (hypothesis, derandomised: the same cases on every
machine) and asserts that the code under test either succeeds or raises `UserError` with a message —
never another exception. The counts are printed (`pytest -s tests/test_fuzz.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm_cli.config.loading import load_recipe
from minillm_cli.config.schema import Recipe
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError

CASES = 300
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: dict[str, list[int]] = {}


def _schema_keys() -> list[str]:
    """Every dotted key of the recipe schema, plus a few that are not in it."""
    keys = []
    for section, field in Recipe.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None) or {}
        keys += [f"{section}.{name}" for name in sub] or [section]
    keys += [f"method.{k}" for k in ("teacher_mix", "kd_ratio", "beta", "lmbda", "num_rollouts", "clip_eps")]
    return keys + ["models", "method", "optim", "bogus.key", "train.max_steps.x", "method.name"]


KEYS = _schema_keys()
# Any code point, lone surrogates included (JSON and YAML escapes can produce them).
ANY_TEXT = st.text(st.one_of(st.characters(codec=None, categories=None),
                             st.sampled_from(["\ud83d", "\udc00", "\x00", "[", "/", "\ufeff", "\n", ","])), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    ANY_TEXT, st.sampled_from(["inf", "1e999", "-1", "0", "nan", "sft", "kd", "minillm", "[", "{a: 1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                      max_leaves=6)


def _tree_from(pairs: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for dotted, value in pairs:
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return tree


def _yaml_text(tree: dict) -> str:
    try:
        return yaml.safe_dump(tree, allow_unicode=False)
    except yaml.YAMLError:
        return json.dumps(tree, default=str)  # JSON is YAML too


RECIPE_TEXTS = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6).map(_tree_from).map(_yaml_text),
    ANY_TEXT,
    st.sampled_from(["a: [1, 2", "method: sft\nmethod: kd\n", "- 1\n- 2\n", "&a [*a]", "!!python/object:os.system {}",
                     "optim: {lr: .inf}", "train: {max_steps: 1e999}", "\ufeffmethod: sft", "x: !!binary AAAA"]),
)
OVERRIDES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(KEYS), st.one_of(ANY_TEXT, SCALARS.map(lambda v: json.dumps(v, default=str))))
        .map(lambda kv: f"{kv[0]}={kv[1]}"),
        ANY_TEXT,
        st.sampled_from(["=", "a=", "=b", "optim..lr=1", "optim.lr==1", "method=kd", "method.name=bogus", "x.y.z.w=1"]),
    ),
    max_size=5,
)


def _count(name: str) -> None:
    COUNTS.setdefault(name, [0])[0] += 1


@FUZZ
@given(text=RECIPE_TEXTS, overrides=OVERRIDES)
def test_load_recipe_gives_a_recipe_or_a_user_error(tmp_path_factory, text, overrides):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    try:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        path.write_bytes(text.encode("utf-8", "replace"))
    _count("recipes")
    try:
        load_recipe(path, overrides)
    except UserError as e:
        assert str(e).strip()  # a message (the CLI prints it on one line, whatever user text it quotes)


COLUMNS = ["instruction", "input", "output", "response", "prompt", "completion", "context", "messages", "references",
           "role", "content"]
ROW_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(COLUMNS) | ANY_TEXT, inner,
                                                                         max_size=3), max_leaves=8)
ROWS = st.one_of(
    st.dictionaries(st.sampled_from(COLUMNS), ROW_VALUES, max_size=4),
    st.fixed_dictionaries({"instruction": ANY_TEXT, "output": ANY_TEXT}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant",
                                                                                                 "system", "x"]),
                                                                        "content": ANY_TEXT}), max_size=3)}),
    ROW_VALUES,
)
LINES = st.one_of(ROWS.map(lambda r: json.dumps(r, default=str)), ANY_TEXT, st.sampled_from(["{", "[1,", '"x"', ""]))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def _encode(path: Path, tokenizer) -> None:
    examples = data_mod.load_examples(str(path))
    for template in ("chat", "instruction"):
        data_mod.encode_examples(examples, tokenizer, template=template, max_prompt_tokens=16, max_total_tokens=32)


@FUZZ
@given(lines=st.lists(LINES, min_size=0, max_size=4), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       bom=st.booleans())
def test_data_reader_gives_examples_or_a_user_error(tmp_path_factory, tokenizer, lines, suffix, bom):
    path = tmp_path_factory.mktemp("d") / f"train{suffix}"
    if suffix == ".json":
        text = "[" + ",".join(lines) + "]"
    elif suffix == ".csv":
        text = "\n".join(["instruction,output", *lines])
    else:
        text = "\n".join(lines)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8", "surrogatepass"))
    _count("data files")
    try:
        _encode(path, tokenizer)
    except UserError as e:
        assert str(e).strip()  # a message (the CLI prints it on one line, whatever user text it quotes)


# ------------------------------------------------------------------ teacher-cache manifests
def _valid_manifest() -> dict:
    from minillm_cli.data import cache_format

    ident = {"kind": "logprobs", "examples": 5, "tokens": 40, "vocab": 320, "rows": "0" * 64, "tokenizer": "1" * 64,
             "data.train": "2" * 64}
    return cache_format.new_manifest(ident, teacher={"path": "T", "sha256": "3" * 64}, top_k=8, dtype="fp16", shard_examples=2)


MANIFEST_EDITS = st.lists(st.tuples(
    st.sampled_from(["format", "version", "identity", "shards", "shard_bytes", "complete", "identity.kind",
                     "identity.examples", "identity.shard_examples", "identity.top_k", "identity.dtype",
                     "identity.teacher", "identity.tokens", "identity.rows"]),
    st.one_of(st.just("<delete>"), VALUES)), max_size=4)


@FUZZ
@given(edits=MANIFEST_EDITS, raw=st.one_of(st.none(), ANY_TEXT))
def test_an_edited_cache_manifest_is_read_or_refused_in_one_line(tmp_path_factory, edits, raw):
    """A hand-edited or damaged manifest: `read_manifest` and what reads its fields next (the shard
    plan, the --out check, `plan`'s K and dtype) give a result or a `UserError`, never a crash."""
    from minillm_cli.commands.teacher_cache import check_out_dir
    from minillm_cli.data import cache_format

    manifest = _valid_manifest()
    for key, value in edits:
        node, *rest = key.split(".")
        target, leaf = (manifest, node) if not rest else (manifest.get(node), rest[0])
        if isinstance(target, dict):
            if value == "<delete>":
                target.pop(leaf, None)
            else:
                target[leaf] = value
    root = tmp_path_factory.mktemp("cache")
    text = raw if raw is not None else json.dumps(manifest, default=str)
    (root / cache_format.MANIFEST).write_bytes(text.encode("utf-8", "surrogatepass"))
    _count("cache manifests")
    try:
        read = cache_format.read_manifest(root)
        assert read is not None
        sizes = [cache_format.shard_size(read["identity"], i) for i in range(read["shards"])]
        assert sum(sizes) == read["identity"]["examples"]
        check_out_dir(root, _valid_manifest())
    except UserError as e:
        assert str(e).strip() and len(str(e)) < 1000


# ------------------------------------------------------------------ accelerate config files
ACCELERATE_TEXTS = st.one_of(
    st.lists(st.tuples(st.sampled_from(["distributed_type", "num_processes", "fsdp_config", "deepspeed_config",
                                        "mixed_precision", "use_cpu"]),
                       st.one_of(VALUES, st.sampled_from(["FSDP", "DEEPSPEED", "MULTI_GPU", "NO", "XLA", "nonsense"]),
                                 st.dictionaries(st.sampled_from(["fsdp_version", "zero_stage", "gradient_clipping",
                                                                  "fsdp_auto_wrap_policy", "fsdp_offload_params",
                                                                  "fsdp_state_dict_type"]), VALUES, max_size=3))),
             max_size=5).map(dict).map(_yaml_text),
    ANY_TEXT,
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}", "- 1", "&a [*a]",
                     "distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: nine}"]),
)


@FUZZ
@given(text=ACCELERATE_TEXTS)
def test_an_accelerate_config_file_is_read_or_refused_in_one_line(tmp_path_factory, text):
    from minillm_cli.parallel.launch_config import SUPPORTED, read_accelerate_config

    path = tmp_path_factory.mktemp("acc") / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _count("accelerate configs")
    try:
        cfg = read_accelerate_config(path)
        assert cfg.distributed_type in SUPPORTED
    except UserError as e:
        assert str(e).strip() and len(str(e)) < 1000


# ------------------------------------------------------------------ output flags
@FUZZ
@given(name=st.one_of(ANY_TEXT, st.sampled_from(["", ".", "/", "-", "..", "data.jsonl", "model", "model/config.json",
                                                   "model/", "sub/deeper/x.json", "x" * 300, "./data.jsonl",
                                                   "model/../data.jsonl", "ro/x.json", "file.txt/x.json"])))
def test_an_output_flag_is_accepted_only_where_nothing_of_the_run_is(tmp_path_factory, name):
    """`--json` / `--samples` / `--plot` destinations: refused in one line, or a writable file path that
    is none of the run's inputs — and checking never touches the disk."""
    import os

    from minillm_cli.runs.destinations import check_file

    root = tmp_path_factory.mktemp("out")
    (root / "data.jsonl").write_text("{}\n")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "file.txt").write_text("x")
    (root / "ro").mkdir(mode=0o500)
    inputs = {"data.train": root / "data.jsonl", "models.student": root / "model"}
    before = sorted(str(p) for p in root.rglob("*"))
    cwd = os.getcwd()
    os.chdir(root)
    _count("output flags")
    try:
        check_file("--json", name, inputs)
        if name != "-":
            target = (root / name).resolve()
            assert not target.is_dir() and name.strip()
            assert target != (root / "data.jsonl").resolve() and (root / "model").resolve() not in target.parents
    except UserError as e:
        assert str(e).strip() and len(str(e)) < 1000
    finally:
        os.chdir(cwd)
    assert sorted(str(p) for p in root.rglob("*")) == before


# ------------------------------------------------------------------ YAML aliases
@st.composite
def alias_bombs(draw) -> str:
    """A recipe whose values are aliases of aliases: width^depth values from a few bytes."""
    depth, width = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    lines = ['a0: &a0 ["x"]']
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    section = draw(st.sampled_from(["train", "method", "data", "bogus"]))
    return "\n".join(lines) + f"\n{section}: {{x: *a{depth}}}\n"


@FUZZ
@given(text=alias_bombs(), as_override=st.booleans())
def test_yaml_alias_bombs_are_refused_fast_with_a_short_line(tmp_path_factory, text, as_override):
    import time

    _count("yaml aliases")
    t0 = time.monotonic()
    try:
        if as_override:
            last = text.strip().splitlines()[-2].split(": ", 1)[1] if text.count("\n") > 2 else "[1]"
            load_recipe(None, [f"train.x={last}"])
        else:
            path = tmp_path_factory.mktemp("y") / "recipe.yaml"
            path.write_text(text)
            load_recipe(path)
    except UserError as e:
        assert str(e).strip() and len(str(e)) < 2000
    assert time.monotonic() - t0 < 5.0


def test_report_counts():
    """Print how many generated cases ran (after the properties above)."""
    print({k: v[0] for k, v in COUNTS.items()}, "in all:", sum(v[0] for v in COUNTS.values()))
    assert all(v[0] >= CASES for v in COUNTS.values()) and len(COUNTS) == 6
