"""The CLI surface: help, version, recipes, import weight, completions, bad input and exit codes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minillm_cli import __version__
from minillm_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_pull_torch_or_transformers():
    code = "import sys, minillm_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    for cmd in ("distill", "sft", "eval", "export", "recipes"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0, cmd
        assert "Usage" in result.output


def test_recipes_list_and_show():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "cpu/minillm" in result.output and "paper/llama-13b-to-7b" in result.output
    result = runner.invoke(app, ["recipes", "cpu/sft"])
    assert result.exit_code == 0 and "method: sft" in result.output
    result = runner.invoke(app, ["recipes", "nope"])
    assert result.exit_code == 2


def test_completions_are_current():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "completions" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for shell, name in gen.SHELLS.items():
        committed = (ROOT / "completions" / name).read_text()
        assert committed == gen.render(shell), f"completions/{name} is stale: run python completions/generate.py"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sft", "optim.lrr=1"], "optim.lrr: unknown key"),
        (["sft", "train.max_steps=abc"], "train.max_steps"),
        (["sft", "missing-recipe.yaml"], "recipe file not found"),
        (["distill", "--teacher", "x", "method.name=bogus"], "method.name"),
        (["distill", "--teacher", "x", "method.max_new_tokens=0"], "method.max_new_tokens"),
    ],
)
def test_bad_recipe_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args + ["--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_missing_data_file(tmp_path, tiny_dir):
    result = runner.invoke(app, ["sft", "--student", str(tiny_dir / "student"), "--data", str(tmp_path / "nope.jsonl"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "data file not found" in result.output
    assert not (tmp_path / "run").exists()


def test_model_path_that_is_not_a_model(tmp_path, tiny_data):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["sft", "--student", str(tmp_path / "empty"), "--data", str(tiny_data),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "empty" in result.output
    assert not (tmp_path / "run").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["sft", "--student", "some-org/some-model", "--data", str(tiny_data),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "some-org/some-model" in result.output
    assert not (tmp_path / "run").exists()


def test_tokenizer_mismatch_stops_before_training(tmp_path, tiny_dir, tiny_data):
    from tests.tiny import make_llama, make_tokenizer

    make_tokenizer(tmp_path / "tok2", vocab_size=300)
    make_llama(tmp_path / "other", tmp_path / "tok2", layers=1, hidden=16)
    result = runner.invoke(app, ["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(tmp_path / "other"),
                                 "--data", str(tiny_data), "--output", str(tmp_path / "run"), "method.name=kd"])
    assert result.exit_code == 2 and "tokenizer" in result.output.lower()
    assert not (tmp_path / "run").exists()


def test_training_options_map_to_recipe_keys_once():
    from minillm_cli.commands.options import OPTIONS, recipe_flags

    params = {"teacher": "t", "student": None, "output": "run", "overwrite": False, "resume": True, "max_steps": 3}
    assert recipe_flags(params) == {"models.teacher": "t", "models.student": None, "output.dir": "run",
                                    "output.overwrite": None, "train.max_steps": 3}
    assert recipe_flags({"overwrite": True}) == {"output.overwrite": True}
    # every option that sets a recipe key names a real one
    from minillm_cli.config.loading import load_recipe

    keys = [o.key for o in OPTIONS.values() if o.key]
    values = {"models.teacher": "t", "models.student": "s", "data.train": "d", "output.dir": "o",
              "method.name": "kd", "train.max_steps": 2, "output.overwrite": True}
    assert sorted(keys) == sorted(values)
    recipe, source = load_recipe(None, [], values)
    assert recipe.train.max_steps == 2 and recipe.method.name == "kd" and set(values) <= set(source)


def test_every_option_has_one_spelling_and_one_help_across_commands():
    """An option name means one thing: the same help text in every command that takes it, and the
    output directory is -o/--output everywhere (the old --out is a hidden alias)."""
    import typer.main

    group = typer.main.get_command(app)
    seen: dict[str, tuple[str, str]] = {}
    for name, command in group.commands.items():
        for param in command.params:
            for flag in param.opts:
                if not flag.startswith("-"):
                    continue
                help_text = getattr(param, "help", None) or ""
                if flag in seen:
                    assert seen[flag][1] == help_text, (flag, seen[flag][0], name)
                seen[flag] = (name, help_text)
            if "--out" in param.opts:
                assert param.hidden, name
    for name in ("distill", "sft", "teacher-cache", "export"):
        flags = {f for p in group.commands[name].params for f in p.opts}
        assert {"-o", "--output"} <= flags, name


def test_launch_job_round_trips_every_shipped_recipe():
    """The multi-process children train `validate(recipe.model_dump())`: it must be the same recipe."""
    from minillm_cli.config.loading import is_pipeline, load_recipe, shipped_recipes
    from minillm_cli.config.validation import validate

    for path in [p for p in shipped_recipes() if not is_pipeline(p)]:
        recipe, _ = load_recipe(path, ["models.teacher=t"])
        assert validate(recipe.model_dump(mode="json", by_alias=True)) == recipe, path


def test_hidden_train_command(tmp_path):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "_train" not in result.output
    bad = tmp_path / "job.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["_train", str(bad)])
    assert result.exit_code == 2 and "job file" in result.output
