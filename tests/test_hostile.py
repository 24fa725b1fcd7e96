"""What a hostile user tried on the newer features, and what must hold now (issue 32).

Each case drives the CLI and checks the exit code, one `error:` line naming the culprit (bounded in
length), no traceback, and — with a before/after snapshot of the file tree — that nothing of the
user's was created, changed or deleted. Output destinations are checked before any work and may
never be an input of the run; multi-process runs keep the single-process promises.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import cli, cli_process, error_line, refused, sft_args

MINILLM = ["method.name=minillm", "method.max_new_tokens=6", "method.num_rollouts=8", "method.ppo_epochs=1",
           "rollout.batch_size=4", "train.batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=1",
           "data.dev_fraction=0", "train.threads=1"]


def distill_args(tiny_dir: Path, out: str, *extra: str) -> list:
    return ["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", "train.jsonl",
            "-o", out, "--max-steps", 2, *MINILLM, *extra]


# ------------------------------------------------------------- 1. output flags never name an input
def test_json_of_a_training_run_never_replaces_its_inputs(user, tiny_dir):
    student = user / "mystudent"
    shutil.copytree(tiny_dir / "student", student)
    refused(sft_args(student, "train.jsonl", "runs/a", "--json", "train.jsonl"), ["--json train.jsonl", "data.train"],
            user)
    refused(sft_args(student, "train.jsonl", "runs/a", "--json", "mystudent/config.json"), "models.student", user)
    refused(sft_args(student, "train.jsonl", "runs/a", "--json", "runs/a/summary.json"), "the run directory", user)
    (user / "recipe.yaml").write_text("optim: {lr: 1.0e-3}\n")
    refused(["sft", "recipe.yaml", "--student", student, "--data", "train.jsonl", "-o", "runs/a", "--json",
             "recipe.yaml"], "the recipe", user)
    # an input named only inside the recipe file is found once the recipe is read
    (user / "r2.yaml").write_text(f"models: {{student: {student}}}\ndata: {{train: train.jsonl}}\n")
    refused(["sft", "r2.yaml", "-o", "runs/a", "--json", "train.jsonl"], "data.train", user)


def test_eval_outputs_never_replace_the_evaluation_data_a_model_or_each_other(user, tiny_dir):
    shutil.copy(user / "train.jsonl", user / "evald.jsonl")
    base = ["eval", tiny_dir / "student", "--data", "evald.jsonl", "--max-samples", 2, "--seeds", 1]
    refused([*base, "--samples", "evald.jsonl"], ["--samples evald.jsonl", "--data"], user)
    refused([*base, "--json", "evald.jsonl"], "--data", user)
    refused([*base, "--json", "out.json", "--samples", "out.json"], "the same file as --json", user)
    model = user / "m"
    shutil.copytree(tiny_dir / "student", model)
    refused(["eval", "m", "--data", "evald.jsonl", "--json", "m/config.json"], "model m", user)


@pytest.mark.parametrize("name", ["", ".", "/", "runs"])
def test_json_that_cannot_be_a_file_is_refused_before_any_work(user, tiny_dir, name):
    (user / "runs").mkdir()
    line = refused(sft_args(tiny_dir / "student", "train.jsonl", "runs/a", "--json", name), "--json", user)
    assert "directory" in line or "empty path" in line
    # with a bad recipe the same line and exit code 2 (not a ValueError traceback)
    refused(["sft", "optim.lr=-1", "--json", name], "--json", user)


def test_json_with_a_missing_parent_is_written_there(user, tiny_dir):
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", "--json", "reports/ci/run.json", steps=1))
    assert code == 0, out[-2000:]
    summary = json.loads((user / "reports/ci/run.json").read_text())
    assert summary["exit_code"] == 0 and summary["final_step"] == 1
    assert not [p for p in user.rglob(".*tmp-*")], "a temporary summary file was left behind"


# ------------------------------------------------------------- 2 + 6. teacher-cache --out
def test_cache_out_never_deletes_a_users_tmp_named_file(user, tiny_dir):
    (user / "mine").mkdir()
    (user / "mine" / ".tmp-shard-notes").write_text("my file")
    refused(["teacher-cache", "--teacher", tiny_dir / "teacher", "--data", "train.jsonl", "--out", "mine"],
            ["--out", ".tmp-shard-notes"], user)
    refused(["teacher-cache", "--teacher", tiny_dir / "teacher", "--data", "train.jsonl", "--out", "."],
            "contains data.train", user)


def test_a_failed_cache_build_leaves_no_directory_and_the_retry_works(user, tiny_dir):
    bad = user / "truncated-teacher"
    shutil.copytree(tiny_dir / "teacher", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    refused(["teacher-cache", "--teacher", bad, "--data", "train.jsonl", "--out", "np/sub/cache", "--top-k", 4],
            "model.safetensors", user)
    assert not (user / "np").exists()
    code, out = cli("teacher-cache", "--teacher", tiny_dir / "teacher", "--data", "train.jsonl", "--out",
                    "np/sub/cache", "--top-k", 4)
    assert code == 0, out[-2000:]
    assert json.loads((user / "np/sub/cache/manifest.json").read_text())["complete"] is True


# ------------------------------------------------------------- 5. an edited cache manifest
@pytest.mark.parametrize("edit,needle", [("drop identity", "'identity' must be a mapping"),
                                         ("shards six", "'shards' must be"),
                                         ("top_k text", "'identity.top_k'")])
def test_an_edited_cache_manifest_is_one_line(user, tiny_dir, edit, needle):
    code, out = cli("teacher-cache", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data",
                    "train.jsonl", "--out", "cache", "--top-k", 4)
    assert code == 0, out[-2000:]
    path = user / "cache/manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "drop identity":
        del manifest["identity"]
    elif edit == "shards six":
        manifest["shards"] = "six"
    else:
        manifest["identity"]["top_k"] = "sixty-four"
    path.write_text(json.dumps(manifest))
    refused(["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", "train.jsonl",
             "-o", "runs/kd", "method.name=kd", "data.teacher_cache=cache"], needle, user)
    refused(["teacher-cache", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data",
             "train.jsonl", "--out", "cache", "--top-k", 4], needle, user)


# ------------------------------------------------------------- 8 + 9 + 10. recipe values
def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntrain: {{x: *a{levels}}}\n"


def test_yaml_alias_bombs_are_refused_at_once_in_a_short_line(user):
    (user / "bomb.yaml").write_text(_bomb(7))
    t0 = time.monotonic()
    line = refused(["sft", "bomb.yaml"], ["bomb.yaml", "expands to more than"], user)
    assert len(line) < 400 and time.monotonic() - t0 < 5
    override = "train.x=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
               "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
    line = refused(["sft", override], ["override train.x", "expands to more than"], user)
    assert len(line) < 400


def test_an_error_line_is_never_megabytes(user):
    line = refused(["sft", "train.max_steps=" + "9" * 200_000], "train.max_steps", user)
    assert len(line) < 1000


@pytest.mark.parametrize("override,needle", [
    ("rollout.speculative_tokens=10000", "rollout.speculative_tokens: Input should be less than or equal to 64"),
    ("rollout.speculative_tokens=true", "rollout.speculative_tokens: must be a number, not true"),
    ("optim.lr=false", "optim.lr: must be a number, not false"),
    ("train.report_to=[tensorboard,tensorboard]", "tensorboard is repeated"),
])
def test_values_that_used_to_be_taken_are_refused(user, tiny_dir, override, needle):
    refused(distill_args(tiny_dir, "runs/a", override), needle, user)


def test_speculative_rounds_never_draft_past_the_token_budget(models):
    import torch

    from minillm_cli.sampling.rollout import sample

    student, teacher = models
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = sample(student, prompt, torch.ones_like(prompt), teacher=teacher, alpha=0.2, max_new_tokens=4,
                 eos_token_id=2, pad_token_id=2, generator=torch.Generator().manual_seed(0), speculative_tokens=64)
    assert out.response_ids.shape[1] <= 4
    assert out.teacher_calls <= 4  # a prefill and at most 3 rounds of at most 3 drafts


# ------------------------------------------------------------- 3 + 4. several processes
def test_bad_multi_process_input_is_found_before_any_process_starts(user, tiny_dir, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    refused(distill_args(tiny_dir, "runs/a", "--accelerate-config", "fsdp", "models.teacher_placement=sharded",
                         "--num-processes", 2), "a sharded teacher cannot sample", user)
    (user / "empty.yaml").write_text("")
    (user / "binary.yaml").write_bytes(bytes(range(256)))
    (user / "nonsense.yaml").write_text("distributed_type: NONSENSE\n")
    (user / "fsdp1.yaml").write_text("distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}\n")
    for name, needle in (("empty.yaml", "empty file"), ("binary.yaml", "unreadable"), ("nonsense.yaml", "NONSENSE"),
                         ("fsdp1.yaml", "fsdp_version 1")):
        refused(distill_args(tiny_dir, "runs/a", "--accelerate-config", name, "--num-processes", 2),
                ["--accelerate-config", needle], user)
    refused(distill_args(tiny_dir, "runs/a", "--num-processes", 64), "--num-processes: 64", user)


def test_a_multi_process_resume_that_changes_the_recipe_is_refused_before_launch(user, tiny_dir, monkeypatch):
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a"))
    assert code == 0, out[-2000:]
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    refused(["sft", "-o", "runs/a", "--resume", "--num-processes", 2, "optim.lr=1e-2"], "optim.lr", user)
    refused(["sft", "-o", "runs/a", "--resume", "--num-processes", 2], "saved by 1", user)


def _minillm(args: list[str], tmp: Path) -> subprocess.Popen:
    """`minillm ARGS` in a separate process whose temporary files go to `tmp`."""
    return cli_process(args, {"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})


def _processes_naming(marker: str) -> list[int]:
    """pids of live processes whose command line holds `marker` (the launcher and workers of a run)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(entry))
    return pids


def _latest_step(run: Path) -> int:
    latest = run / "latest"
    return int(latest.read_text().strip().removeprefix("step-")) if latest.exists() else 0


def _signal_after_checkpoint(args: list[str], run: Path, tmp: Path, sig: int, after: int) -> tuple[int, str]:
    """Start `minillm ARGS`, send `sig` to that process alone (as `kill PID` or a terminal's Ctrl-C
    does) once the run has a checkpoint newer than step `after`; returns (exit code, output)."""
    proc = _minillm(args, tmp)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _latest_step(run) <= after and proc.poll() is None:
        time.sleep(0.2)
    assert _latest_step(run) > after, "no new checkpoint within 4 minutes"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_of_a_multi_process_run_stops_every_worker_resumably(tmp_path, tiny_dir, tiny_data,
                                                                                     sig):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"), "--data",
            str(tiny_data), "-o", str(run), "--max-steps", "500", *MINILLM, "train.save_every=1", "--num-processes", "2"]
    for command in (args, ["distill", "-o", str(run), "--resume", "--num-processes", "2"]):
        before = _latest_step(run)
        code, out = _signal_after_checkpoint(command, run, tmp, sig, after=before)
        assert code == 128 + sig, out[-3000:]
        assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
        assert error_line(out).startswith(f"error: {signal.Signals(sig).name} received: stopped after step"), out[-3000:]
        time.sleep(1)
        assert _processes_naming(str(run)) == [], "workers outlived the run"
        assert list(tmp.iterdir()) == [], "the job directory was left behind"
        assert _latest_step(run) > before  # the first run saved; the resumed one continued and saved again


@pytest.mark.slow
def test_a_worker_error_is_one_line_with_exit_code_2_and_the_json_says_so(tmp_path, tiny_dir, tiny_data):
    bad = tmp_path / "student"
    shutil.copytree(tiny_dir / "student", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(500)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    summary = tmp_path / "summary.json"
    proc = _minillm(["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(bad), "--data", str(tiny_data),
                     "-o", str(tmp_path / "run"), *MINILLM, "--num-processes", "2", "--json", str(summary)], tmp)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "model.safetensors" in error_line(out) and "ChildFailedError" not in out
    report = json.loads(summary.read_text())
    assert report["exit_code"] == 2 and report["status"].startswith("bad input") and "model.safetensors" in report["message"]
    assert not (tmp_path / "run").exists() and list(tmp.iterdir()) == []


def test_a_home_of_no_user_is_one_line_wherever_a_path_goes(user, tiny_dir):
    ghost = "~no-such-user-here"
    refused(sft_args(tiny_dir / "student", f"{ghost}/train.jsonl", "runs/a"), ["data.train", ghost], user)
    refused(sft_args(f"{ghost}/student", "train.jsonl", "runs/a"), ["models.student", ghost], user)
    refused(["eval", tiny_dir / "student", "--data", f"{ghost}/x.jsonl"], ["--data", ghost], user)
    refused(["export", f"{ghost}/run", "-o", "out"], ["RUN", ghost], user)
    refused(["teacher-cache", "--teacher", tiny_dir / "teacher", "--data", "train.jsonl", "-o", f"{ghost}/c"],
            ["-o/--output", ghost], user)
