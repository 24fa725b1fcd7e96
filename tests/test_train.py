"""End to end training on tiny models: every method runs, SFT learns, resume is exact, signals save."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minillm_cli.config.loading import load_recipe, shipped_recipes
from minillm_cli.runs.checkpoint import latest_step_dir, list_steps, write_text_atomic
from minillm_cli.train.loop import train
from tests.helpers import METHOD_EXTRA, TRAIN_COMMON, cli_process, same_weights, train_tiny, weights


@pytest.mark.parametrize("method", list(METHOD_EXTRA))
def test_every_method_runs_and_checkpoints(tmp_path, tiny_dir, tiny_data, method):
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", method, 3, METHOD_EXTRA[method])
    step = latest_step_dir(run)
    assert step is not None and step.name == "step-000003"
    import json

    meta = json.loads((step / "meta.json").read_text())
    assert meta["method"] == method and meta["data"]["sha256"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    if method == "minillm":
        for key in ("reward", "rkl", "pg_loss", "reg_loss", "clip_frac", "resp_len", "rollout_time", "tok_per_s"):
            assert key in lines[0], key
    if method == "seqkd":  # trained on the teacher's text, cached with the run
        cache = run / "seqkd-teacher-responses.jsonl"
        assert cache.exists() and meta["seqkd"]["source"] == "teacher"
    # the checkpoint loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(step)


def test_sft_loss_goes_down_on_memorisation(tmp_path, tiny_dir, tiny_data):
    import json

    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 30,
               ["optim.lr=3e-3", "optim.schedule=constant", "data.dev_fraction=0"])
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


@pytest.mark.parametrize("method", ["sft", "minillm"])
def test_resume_after_kill_is_bitwise_identical(tmp_path, tiny_dir, tiny_data, method):
    extra = METHOD_EXTRA[method] + ["train.save_every=2", "train.keep_last=10"]
    straight = train_tiny(tiny_dir, tiny_data, tmp_path / "straight", method, 5, extra)
    # A run killed (kill -9) right after its step-2 checkpoint is exactly this directory:
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "recipe.yaml", killed / "recipe.yaml")
    shutil.copytree(straight / "step-000002", killed / "step-000002")
    write_text_atomic(killed / "latest", "step-000002\n")
    (killed / ".tmp-step-000004-99999").mkdir()  # a half-written save from the killed process
    train_tiny(tiny_dir, tiny_data, killed, method, 5, extra, resume=True)
    assert same_weights(weights(straight / "step-000005"), weights(killed / "step-000005"))
    if method == "minillm":  # the default, speculative sampler resumes bitwise too
        import json

        records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
        assert any(0 < r.get("draft_accept", 0) <= 1 for r in records), records
    assert not (killed / ".tmp-step-000004-99999").exists()


def test_resume_with_nothing_to_resume(tmp_path, tiny_dir, tiny_data):
    from minillm_cli.errors import UserError

    with pytest.raises(UserError, match="no run directory"):
        train_tiny(tiny_dir, tiny_data, tmp_path / "none", "sft", 2, resume=True)


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_dir, tiny_data):
    from minillm_cli.errors import UserError

    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        train_tiny(tiny_dir, tiny_data, out, "sft", 2)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_sigint_mid_run_saves_last_step_and_resume_matches(tmp_path, tiny_dir, tiny_data):
    base = ["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"),
            "--data", str(tiny_data), "--max-steps", "40", *TRAIN_COMMON, *METHOD_EXTRA["minillm"],
            "method.max_new_tokens=12"]
    straight = subprocess.run([sys.executable, "-m", "minillm_cli.cli", *base, "-o", str(tmp_path / "a")],
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    proc = cli_process([*base, "-o", str(tmp_path / "b")])
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT received" in out and "--resume" in out
    step = latest_step_dir(tmp_path / "b")
    assert step is not None and 0 < int(step.name[5:]) < 40
    resumed = subprocess.run([sys.executable, "-m", "minillm_cli.cli", *base, "-o", str(tmp_path / "b"), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert same_weights(weights(tmp_path / "a" / "step-000040"), weights(tmp_path / "b" / "step-000040"))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, tiny_dir, tiny_data, monkeypatch):
    import errno

    from minillm_cli.errors import UserError
    from minillm_cli.runs import checkpoint

    extra = [*METHOD_EXTRA["sft"], "optim.schedule=constant"]
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 2, extra)
    before = weights(run / "step-000002")

    real_save_file = checkpoint.__dict__.get("save_file")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(UserError, match="disk full.*step-000002 is intact"):
        train_tiny(tiny_dir, tiny_data, run, "sft", 4, extra, resume=True, extend=True)
    assert latest_step_dir(run).name == "step-000002"
    assert same_weights(before, weights(run / "step-000002"))
    assert not list(run.glob(".tmp-*"))
    assert [p.name for p in list_steps(run)] == ["step-000002"]
    del real_save_file


def test_non_finite_loss_skips_then_stops(tmp_path, tiny_dir, tiny_data):
    from minillm_cli.errors import RunStopped

    with pytest.raises(RunStopped, match="consecutive steps with a non-finite"):
        train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 10, ["optim.lr=1e30", "optim.grad_clip=null",
                                                                 "train.max_bad_steps=2", "optim.warmup_steps=0"])


def test_cpu_recipes_run_a_few_steps_on_tiny_models(tmp_path, tiny_dir, tiny_data):
    """Every shipped CPU recipe runs (models and data swapped for the tiny ones, 2 steps)."""
    for path in [p for p in shipped_recipes() if "cpu" in p.parts]:
        recipe, _ = load_recipe(path)
        flags = {"models.teacher": str(tiny_dir / "teacher"), "models.student": str(tiny_dir / "student"),
                 "data.train": str(tiny_data), "data.dev": str(tiny_data), "output.dir": str(tmp_path / path.stem),
                 "train.max_steps": 2}
        over = ["models.student_init=null", "train.batch_size=4", "rollout.batch_size=4"]
        if recipe.method.name == "minillm":
            over += ["method.num_rollouts=8", "method.max_new_tokens=6"]
        if recipe.method.name in ("gkd", "seqkd"):
            over += ["method.max_new_tokens=6"]
        if recipe.models.cross_tokenizer:  # an untrained tiny student writes invalid UTF-8: its rows are dropped
            over += ["method.xtok_max_mismatch=1.0"]
        r, source = load_recipe(path, over, flags)
        run = train(r, source)
        assert latest_step_dir(run) is not None, path


@pytest.mark.slow
def test_second_signal_exits_at_once_without_corrupting(tmp_path, tiny_dir, tiny_data):
    base = ["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"),
            "--data", str(tiny_data), "--max-steps", "400", *TRAIN_COMMON, *METHOD_EXTRA["minillm"],
            "method.max_new_tokens=12", "train.save_every=1", "-o", str(tmp_path / "run")]
    proc = cli_process(base)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (143, -15) or proc.returncode == 143, out[-2000:]
    # whatever moment the second signal hit, every visible step dir is complete and loadable
    for step in list_steps(tmp_path / "run"):
        assert (step / "model.safetensors").exists() and (step / "trainer_state.json").exists()
        weights(step)
    latest = latest_step_dir(tmp_path / "run")
    assert latest is not None and (latest / "meta.json").exists()


def test_trainable_layers_freezes_everything_below_the_top_blocks(tmp_path, tiny_dir, tiny_data):
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 2, ["optim.lr=1e-2", "models.trainable_layers=1"])
    before = load_file(str(tiny_dir / "student" / "model.safetensors"))
    after = weights(run / "step-000002")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)
