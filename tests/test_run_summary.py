"""`minillm distill|sft --json FILE`: a summary of how the run ended, on success and on every failure."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from minillm_cli.cli import app
from minillm_cli.commands.run_summary import EXIT_MEANINGS

runner = CliRunner()
FAST = ["optim.warmup_steps=1", "train.batch_size=4", "train.log_every=1", "train.max_steps=2"]


def _sft(tmp_path: Path, tiny_dir: Path, tiny_data: Path, *extra: str) -> list[str]:
    return ["sft", *FAST, *extra, "--student", str(tiny_dir / "student"), "--data", str(tiny_data),
            "--output", str(tmp_path / "run")]


def test_summary_of_a_finished_run(tmp_path: Path, tiny_dir: Path, tiny_data: Path) -> None:
    out = tmp_path / "summary.json"
    result = runner.invoke(app, [*_sft(tmp_path, tiny_dir, tiny_data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    s = json.loads(out.read_text())
    assert s["command"] == "sft" and s["exit_code"] == 0 and s["status"] == "success" and s["message"] is None
    assert Path(s["run_dir"]) == tmp_path / "run" and s["final_step"] == 2
    assert Path(s["checkpoint"]).name == "step-000002" and (Path(s["checkpoint"]) / "model.safetensors").is_file()
    assert s["resumable"] is False and s["wall_s"] > 0 and s["tokens_per_s"] > 0
    assert s["last_metrics"]["step"] == 2 and "loss" in s["last_metrics"]
    assert not list(tmp_path.glob(".summary.json.tmp-*"))


def test_summary_of_bad_input_names_the_error(tmp_path: Path, tiny_dir: Path, tiny_data: Path) -> None:
    out = tmp_path / "summary.json"
    result = runner.invoke(app, [*_sft(tmp_path, tiny_dir, tiny_data, "optim.lrr=1"), "--json", str(out)])
    assert result.exit_code == 2
    s = json.loads(out.read_text())
    assert s["exit_code"] == 2 and s["status"] == EXIT_MEANINGS[2]
    assert "optim.lrr: unknown key" in s["message"]
    assert s["run_dir"] is None and s["checkpoint"] is None and not (tmp_path / "run").exists()


def test_summary_to_stdout_is_the_only_thing_there(tmp_path: Path, tiny_dir: Path, tiny_data: Path) -> None:
    result = runner.invoke(app, [*_sft(tmp_path, tiny_dir, tiny_data), "--json", "-"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)  # the run's progress went to stderr
    assert s["final_step"] == 2 and "run dir" in result.stderr
    # the next command prints to stdout again
    assert "minillm" in runner.invoke(app, ["--version"]).stdout


def test_every_documented_exit_code_has_a_meaning() -> None:
    readme = (Path(__file__).resolve().parents[1] / "docs" / "promises.md").read_text()
    for code in EXIT_MEANINGS:
        assert f"`{code}`" in readme, code
