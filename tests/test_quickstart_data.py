"""The built-in quickstart dataset: deterministic, well-formed, held out, and correct."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import pytest

from minillm_cli.config.loading import RECIPES_DIR

DATA_DIR = RECIPES_DIR / "data"
FILES = ["quickstart-train.jsonl", "quickstart-dev.jsonl", "quickstart-test.jsonl"]
FIELDS = {"instruction", "input", "output", "source"}
FAMILIES = {"arithmetic", "units", "sorting", "spelling", "rewriting", "facts"}


def _load_script() -> ModuleType:
    """Import recipes/data/make_quickstart_data.py (a script shipped as data, not a module)."""
    path = DATA_DIR / "make_quickstart_data.py"
    spec = importlib.util.spec_from_file_location("make_quickstart_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    """The shipped splits, parsed: {"train": rows, "dev": rows, "test": rows}."""
    splits = {}
    for name in ("train", "dev", "test"):
        lines = (DATA_DIR / f"quickstart-{name}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[name] = [json.loads(line) for line in lines]
    return splits


def _all_rows(shipped: dict[str, list[dict]]) -> list[dict]:
    return [row for rows in shipped.values() for row in rows]


def test_main_is_deterministic_and_matches_shipped_files(script: ModuleType, tmp_path: Path) -> None:
    assert script.main(["--out", str(tmp_path / "a")]) == 0
    assert script.main(["--out", str(tmp_path / "b")]) == 0
    for name in FILES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        # the shipped files must be exactly what the script writes (regenerate them if this fails)
        assert first == (DATA_DIR / name).read_bytes(), f"{name} is stale: rerun make_quickstart_data.py"


def test_sizes_balance_and_total_size(shipped: dict[str, list[dict]]) -> None:
    assert {name: len(rows) for name, rows in shipped.items()} == {"train": 2004, "dev": 102, "test": 204}
    for name, rows in shipped.items():
        counts = collections.Counter(row["source"] for row in rows)
        assert set(counts) == FAMILIES, name
        assert len(set(counts.values())) == 1, f"{name} is unbalanced: {counts}"
    assert sum((DATA_DIR / name).stat().st_size for name in FILES) < 1_000_000


def test_every_row_has_four_string_fields(shipped: dict[str, list[dict]]) -> None:
    for row in _all_rows(shipped):
        assert set(row) == FIELDS, row
        assert all(isinstance(row[key], str) for key in FIELDS), row
        assert row["instruction"].strip() and row["output"].strip(), row
        # short enough for the CPU budget (about 4 characters per token)
        assert len(row["instruction"]) + len(row["input"]) <= 160, row
        assert len(row["output"]) <= 80, row


def test_no_pair_repeats_and_dev_test_are_held_out(shipped: dict[str, list[dict]]) -> None:
    keys = {name: [(row["instruction"], row["input"]) for row in rows] for name, rows in shipped.items()}
    for name, split_keys in keys.items():
        assert len(split_keys) == len(set(split_keys)), f"duplicate pair in {name}"
    train = set(keys["train"])
    assert not train & set(keys["dev"])
    assert not train & set(keys["test"])
    assert not set(keys["dev"]) & set(keys["test"])


def test_arithmetic_answers_are_correct(shipped: dict[str, list[dict]]) -> None:
    rows = [row for row in _all_rows(shipped) if row["source"] == "arithmetic"]
    ops = collections.Counter()
    for row in rows:
        match = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.", row["output"])
        assert match, row
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], row
        # the question asks about the same two numbers
        question = row["instruction"] + " " + row["input"]
        assert re.findall(r"\d+", question) in ([str(a), str(b)], [str(b), str(a)]), row
        ops[op] += 1
    assert set(ops) == {"+", "-", "*"}


def test_unit_conversions_are_correct(shipped: dict[str, list[dict]]) -> None:
    per_unit = {"centimeter": Fraction(1, 100), "meter": Fraction(1), "minute": Fraction(1),
                "hour": Fraction(60), "gram": Fraction(1), "kilogram": Fraction(1000)}
    for row in (r for r in _all_rows(shipped) if r["source"] == "units"):
        match = re.fullmatch(r"([\d.]+) (\w+?)s? is ([\d.]+) (\w+?)s?\.", row["output"])
        assert match, row
        src, dst = Fraction(match[1]) * per_unit[match[2]], Fraction(match[3]) * per_unit[match[4]]
        assert src == dst, row
        assert f"{match[1]} {match[2]}" in row["instruction"] + row["input"], row


def test_sorted_rows_are_sorted(shipped: dict[str, list[dict]]) -> None:
    rows = [row for row in _all_rows(shipped) if row["source"] == "sorting"]
    assert len(rows) > 100
    for row in rows:
        given, answer = row["input"].split(", "), row["output"].split(", ")
        assert sorted(given) == sorted(answer), row  # same items
        if "words" in row["instruction"]:
            assert answer == sorted(given), row
        else:
            descending = "largest to smallest" in row["instruction"] or "descending" in row["instruction"]
            assert [int(x) for x in answer] == sorted(map(int, given), reverse=descending), row


def test_spelling_answers_are_correct(shipped: dict[str, list[dict]]) -> None:
    kinds = collections.Counter()
    for row in (r for r in _all_rows(shipped) if r["source"] == "spelling"):
        output = row["output"]
        if match := re.fullmatch(r'The word "(\w+)" spelled backwards is "(\w+)"\.', output):
            assert match[2] == match[1][::-1] and match[1] != match[2], row
            kinds["backwards"] += 1
        elif match := re.fullmatch(r'The word "(\w+)" has (\d+) letters\.', output):
            assert int(match[2]) == len(match[1]), row
            kinds["count"] += 1
        elif match := re.fullmatch(r'The (first|last) letter of "(\w+)" is "(\w)"\.', output):
            assert match[3] == (match[2][0] if match[1] == "first" else match[2][-1]), row
            kinds[match[1]] += 1
        else:
            pytest.fail(f"unexpected spelling output: {row}")
        word = match[2] if "letter of" in output else match[1]
        assert word in row["instruction"] + " " + row["input"], row  # answers about the asked word
    assert set(kinds) == {"backwards", "count", "first", "last"}


def test_rewriting_and_facts_spot_checks(shipped: dict[str, list[dict]], script: ModuleType) -> None:
    rows = _all_rows(shipped)
    for row in (r for r in rows if r["source"] == "rewriting"):
        if row["output"].isupper():
            assert row["output"] == row["input"].upper(), row
        elif match := re.fullmatch(r'The plural of "(\w+)" is "(\w+)"\.', row["output"]):
            assert script.PLURALS[match[1]] == match[2], row
        else:  # past tense: same subject and ending, the verb swapped for its past form
            subject, verb, rest = row["input"].split(" ", 2)
            past = {present: past for present, past, _ in script.VERBS}[verb]
            assert row["output"] == f"{subject} {past} {rest}", row
    for row in (r for r in rows if r["source"] == "facts"):
        question, output = row["instruction"] + " " + row["input"], row["output"]
        if match := re.fullmatch(r"The capital of (.+) is (.+)\.", output):
            assert script.CAPITALS[match[1]] == match[2] and match[1] in question, row
        elif match := re.fullmatch(r'The opposite of "(\w+)" is "(\w+)"\.', output):
            assert (match[1], match[2]) in script.OPPOSITES or (match[2], match[1]) in script.OPPOSITES, row
        elif match := re.fullmatch(r'An? (\w+) says "(.+)"\.', output):
            assert script.SOUNDS[match[1]] == match[2] and match[1] in question, row
        else:
            thing, color = output.rstrip(".").rsplit(" is ", 1)
            assert script.COLORS[thing[0].lower() + thing[1:]] == color, row
