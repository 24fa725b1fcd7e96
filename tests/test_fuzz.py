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

from minillm_cli import data as data_mod
from minillm_cli.config import Recipe
from minillm_cli.errors import UserError
from minillm_cli.recipe_loading import load_recipe

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


def test_report_counts():
    """Print how many generated cases ran (after the two properties above)."""
    print({k: v[0] for k, v in COUNTS.items()})
    assert all(v[0] >= CASES for v in COUNTS.values()) and len(COUNTS) == 2
