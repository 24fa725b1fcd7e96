"""bench/quality/run.py: argument parsing, per-prompt scores, length buckets, intervals and targets.

The study itself takes hours; these check the pieces that turn its reports into claims, on small
hand-made inputs where the right answer is known."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minillm_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study() -> Any:
    spec = importlib.util.spec_from_file_location("quality_run", REPO / "bench" / "quality" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_eval_sets_default_and_given(study: Any, tmp_path: Path) -> None:
    assert set(study.parse_sets(None, "shared")) == {"dev", "seed-tasks"}
    assert set(study.parse_sets(None, "builtin")) == {"test"}
    assert study.parse_sets(["mine=/x/a.jsonl", "b=rel.jsonl"], "shared") == {
        "mine": Path("/x/a.jsonl"), "b": Path("rel.jsonl")}
    for bad in (["noequals"], ["=a.jsonl"], ["a="], ["a/b=c.jsonl"]):
        with pytest.raises(UserError, match="--eval-set"):
            study.parse_sets(bad, "shared")
    with pytest.raises(UserError, match="given twice"):
        study.parse_sets(["a=x", "a=y"], "shared")


def test_arms_always_include_the_two_comparison_rows(study: Any) -> None:
    assert study.parse_arms("minillm") == ["kd", "sft-continued", "minillm"]
    assert set(study.parse_arms("minillm,minillm")) == {"minillm", "kd", "sft-continued"}
    with pytest.raises(UserError, match="unknown arm 'nope'"):
        study.parse_arms("nope")
    default = study.parse_arms(None)
    assert "minillm" in default and "minillm-exact" in default and "sft-continued" in default
    # the paper-exact arm differs from the reference default only in include_current
    diff = {k for k in set(study.ARMS["minillm"]) | set(study.ARMS["minillm-exact"])
            if study.ARMS["minillm"].get(k) != study.ARMS["minillm-exact"].get(k)}
    assert diff == {"include_current"} and study.ARMS["minillm-exact"]["include_current"] is False


def test_learning_rate_candidates_differ_from_minillm_only_in_lr(study: Any) -> None:
    setup = study.STUDIES["builtin"]
    assert study.arm_lr(setup, "minillm") == setup.lr["minillm"]
    assert study.arm_lr(setup, "kd") == setup.lr["kd"]
    for name, lr in study.ARM_LR.items():
        assert study.ARMS[name] == study.ARMS["minillm"], name
        assert study.arm_lr(setup, name) == lr != setup.lr["minillm"]


def test_a_dev_split_summary_never_replaces_the_held_out_one(study: Any) -> None:
    assert study.summary_stem("builtin", study.parse_sets(None, "builtin")) == "summary"
    assert study.summary_stem("shared", study.parse_sets(None, "shared")) == "summary"
    assert study.summary_stem("builtin", {"builtin-dev": Path("d.jsonl")}) == "summary-builtin-dev"
    assert study.summary_stem("shared", {"dev": Path("a"), "mine": Path("b")}) == "summary-dev+mine"


def test_precision_recall_come_from_the_best_reference(study: Any) -> None:
    row = {"response": "the cat is running home", "references": ["the cat sat", "a cat runs home"]}
    # best F: "a cat runs home" (P = 3/5, R = 3/4), not "the cat sat" (P = 2/5, R = 2/3)
    assert study.rouge_precision_recall(row) == pytest.approx((60.0, 75.0))


def _samples(path: Path, responses: dict[tuple[int, int], str], ref: str = "the cat sat on the mat") -> Path:
    path.write_text("".join(json.dumps({"model": "m", "seed": s, "index": i, "prompt": "p", "response": r,
                                        "references": [ref]}) + "\n" for (s, i), r in responses.items()))
    return path


def test_per_prompt_scores_are_seeds_by_prompts_in_index_order(study: Any, tmp_path: Path) -> None:
    rows = {(20, 7): "the cat sat on the mat", (10, 7): "dog", (10, 3): "the cat", (20, 3): "mat"}
    index, values, _ = study.per_prompt(_samples(tmp_path / "s.jsonl", rows), study.rouge_of)
    assert index == [3, 7]
    assert values.shape == (2, 2)
    assert values[1, 1] == pytest.approx(100.0)  # seed 20, prompt 7: the reference itself
    assert values[0, 1] == pytest.approx(0.0)
    assert 0 < values[0, 0] < 100
    del rows[(20, 3)]
    with pytest.raises(UserError, match="every prompt"):
        study.per_prompt(_samples(tmp_path / "t.jsonl", rows), study.rouge_of)


def test_length_buckets_are_tertiles(study: Any) -> None:
    words = np.array([1, 2, 3, 10, 11, 12, 50, 60, 70])
    ids, labels = study.length_buckets(words)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert labels[0].startswith("<= 3") and labels[2].startswith("> 12")


def test_interval_finds_a_real_gain_and_calls_no_difference_noise(study: Any) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 60, size=(3, 200))
    better = study.interval(base + 2.0 + rng.normal(0, 1, size=base.shape), base)
    assert better["low"] > 0 and not better["within_noise"]
    same = study.interval(base + rng.normal(0, 5, size=base.shape), base)
    assert same["within_noise"]


def test_targets_need_the_interval_above_zero(study: Any) -> None:
    def row(vs_kd: tuple[float, float, float], vs_sft: tuple[float, float, float], exacc: float) -> dict[str, Any]:
        mk = lambda d: {"diff": d[0], "low": d[1], "high": d[2], "within_noise": d[1] <= 0 <= d[2]}  # noqa: E731
        return {"vs_kd": mk(vs_kd), "vs_sft-continued": mk(vs_sft), "exaccerr": exacc, "exaccerr_at": "exaccerr@32"}

    sets = {"test": {"rows": {
        "kd": {"exaccerr": 10.0, "exaccerr_at": "exaccerr@32"},
        "minillm": row((1.5, 0.2, 2.8), (0.5, -0.4, 1.4), 8.0),  # kd target met; sft's interval covers 0
        "minillm-exact": row((0.9, 0.1, 1.7), (1.0, 0.3, 1.8), 12.0),  # gain over kd below 1
    }}}
    met = {(c["arm"], c["target"].split(",")[0]): c["met"] for c in study.check_targets(sets)}
    assert met[("minillm", "rougeL >= kd + 1")] is True
    assert met[("minillm", "rougeL >= sft-continued")] is False
    assert met[("minillm", "exaccerr@32 below kd's")] is True
    assert met[("minillm-exact", "rougeL >= kd + 1")] is False
    assert met[("minillm-exact", "rougeL >= sft-continued")] is True
    assert met[("minillm-exact", "exaccerr@32 below kd's")] is False


def test_a_study_directory_refuses_other_settings(study: Any, tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(file=open(tmp_path / "log", "w"))  # noqa: SIM115 - closed with the test's tmp dir
    study.Study(tmp_path / "s", "builtin", study.BUILTIN, "full", console)
    study.Study(tmp_path / "s", "builtin", study.BUILTIN, "full", console)  # same settings: resumes
    with pytest.raises(UserError, match="arm_steps"):
        study.Study(tmp_path / "s", "builtin", replace(study.BUILTIN, arm_steps=7), "full", console)


def test_an_eval_set_name_is_bound_to_its_file(study: Any, tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(file=open(tmp_path / "log", "w"))  # noqa: SIM115
    s = study.Study(tmp_path / "s", "builtin", study.BUILTIN, "full", console)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt": "x", "response": "y"}\n')
    b.write_text('{"prompt": "x", "response": "z"}\n')
    assert s.set_dir("mine", a) == s.set_dir("mine", a)
    with pytest.raises(UserError, match="give the set another name"):
        s.set_dir("mine", b)


def test_stopping_rows_read_length_eos_and_intervals_from_a_divergence_report(study: Any) -> None:
    stopping = sys.modules["stopping"]  # bench/quality/stopping.py, imported by run.py
    eos = {"q_eos": [0.1, 0.2, 0.5, 0.9], "p_eos": [0.1, 0.1, 0.3, 0.8], "count": [4, 4, 2, 1],
           "stopped_q": [0.1, 0.28, 0.5, 0.6], "stopped_p": [0.1, 0.19, 0.3, 0.4]}
    ci = {"diff": 1.0, "low": 0.5, "high": 1.5, "within_noise": False}
    div = {"models": [
        {"name": "T (teacher)", "metrics": {"length": {"mean": 9.0}, "stopped": {"mean": 100.0}},
         "curves": {"length": {"p10": 3, "p25": 5, "p50": 8, "p75": 11, "p90": 14, "max": 20}}},
        {"name": "/runs/minillm/step-40", "metrics": {"length": {"mean": 20.0}, "stopped": {"mean": 50.0},
                                                      "eos_gap": {"mean": 5.0}, "rkl_student": {"mean": 1.3}},
         "curves": {"eos": eos}},
        {"name": "/runs/pt/step-40", "metrics": {"length": {"mean": 12.0}, "stopped": {"mean": 75.0},
                                                 "eos_gap": {"mean": 2.0}, "exaccerr@9": {"mean": -3.0}},
         "curves": {"eos": eos}}],
        "comparisons": {"/runs/minillm/step-40": {"models": {"/runs/pt/step-40": {"length": ci, "eos_gap": ci}}}}}
    rows = stopping.stopping_rows(div, {"/runs/minillm/step-40": "minillm", "/runs/pt/step-40": "minillm-pt"})
    assert set(rows) == {"teacher", "minillm", "minillm-pt"}
    assert rows["teacher"]["quantiles"]["p50"] == 8 and rows["teacher"]["stopped"] == 100.0
    # positions 1-4: count-weighted means of q and p: (0.4 + 0.8 + 1.0 + 0.9) / 11 and (0.4 + 0.4 + 0.6 + 0.8) / 11
    assert rows["minillm"]["gap_by_bucket"][0] == pytest.approx(100 * (3.1 - 2.2) / 11)
    assert rows["minillm"]["stopped_by"][8] == (0.6, 0.4)  # beyond the curve: its last value
    assert rows["minillm-pt"]["vs_minillm"] == {"length": ci, "eos_gap": ci} and rows["minillm-pt"]["exaccerr"] == -3.0
    block = {"stopping": rows, "div_prompts": 4, "div_seed": 10, "div_new_tokens": 32, "prompts": 4}
    text = "\n".join(stopping.render_stopping(block))
    assert "| minillm | " in text and "50.0 %" in text and "before the 32-token budget" in text
    rq5 = "\n".join(stopping.render_rq5(block, {"minillm-pt": {"rougeL": 6.0, "vs_minillm": ci}}))
    assert "+1.00 [+0.50, +1.50]" in rq5 and "minillm-pt" in rq5
