"""Nothing a user owns is ever destroyed, and a resumed run is the run it claims to be.

Every test drives the CLI (in-process through Typer's runner, or as a subprocess where a second
process or a signal is the point) and checks the exit code, the one-line message naming the
culprit, the absence of a traceback, and — with a before/after snapshot of the file tree — that
nothing the user owns was created, changed or deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm_cli.runs import rundir
from minillm_cli.runs.checkpoint import list_steps, write_text_atomic
from tests.helpers import FAST, cli, error_line, refused, same_weights, sft_args, tree, weights


# ------------------------------------------------------------------------------ 1. --overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_run(user, tiny_dir):
    proj = user / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print(1)")
    shutil.copy(user / "train.jsonl", proj / "train.jsonl")
    student = tiny_dir / "student"
    line = refused(sft_args(student, proj / "train.jsonl", proj, "--overwrite"), "not a minillm run", user)
    assert "train.jsonl" in line and "src/" in line
    refused(sft_args(student, "train.jsonl", ".", "--overwrite"), "not a minillm run", user)
    refused(sft_args(student, "train.jsonl", proj), "not a minillm run", user)  # and without --overwrite


def test_overwrite_replaces_a_run_but_never_what_the_run_reads_or_the_user_added(user, tiny_dir):
    student = tiny_dir / "student"
    code, out = cli(*sft_args(student, "train.jsonl", "runs/a", "train.save_every=1", "train.keep_last=5"))
    assert code == 0, out[-2000:]
    # an existing run is refused without a flag, replaced with --overwrite
    refused(sft_args(student, "train.jsonl", "runs/a"), "already holds a run", user)
    # a student that lives inside the run must not be deleted by replacing it
    refused(sft_args(user / "runs/a/step-000001", "train.jsonl", "runs/a", "--overwrite"), "contains models.student", user)
    # the current directory inside the run
    os.chdir(user / "runs/a/step-000001")
    refused(sft_args(student, user / "train.jsonl", user / "runs/a", "--overwrite"), "contains the current directory", user)
    os.chdir(user)
    # a file the user put into the run is named, and the run is left alone
    (user / "runs/a/my-analysis.ipynb").write_text("{}")
    refused(sft_args(student, "train.jsonl", "runs/a", "--overwrite"), "my-analysis.ipynb", user)
    (user / "runs/a/my-analysis.ipynb").unlink()
    before = {k: v for k, v in tree(user).items() if not k.startswith("runs")}
    code, out = cli(*sft_args(student, "train.jsonl", "runs/a", "--overwrite", steps=1))
    assert code == 0, out[-2000:]
    assert [p.name for p in list_steps(user / "runs/a")] == ["step-000001"]
    assert {k: v for k, v in tree(user).items() if not k.startswith("runs")} == before


def test_resume_and_overwrite_together_are_refused(user, tiny_dir):
    refused([*sft_args(tiny_dir / "student", "train.jsonl", "runs/a"), "--resume", "--overwrite"], "contradict", user)


# ------------------------------------------------------------------------------- 2. --resume
def _killed_copy(straight: Path, killed: Path, step: int, metrics_up_to: int) -> None:
    """What a run killed (kill -9) after its checkpoint `step` and `metrics_up_to` logged steps looks like."""
    killed.mkdir(parents=True)
    for name in ("recipe.yaml", rundir.MARKER):
        shutil.copy(straight / name, killed / name)
    shutil.copytree(straight / f"step-{step:06d}", killed / f"step-{step:06d}")
    write_text_atomic(killed / "latest", f"step-{step:06d}\n")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= metrics_up_to))


def test_resume_alone_reloads_the_saved_recipe_and_is_exact(user, tiny_dir):
    student = tiny_dir / "student"
    code, out = cli(*sft_args(student, "train.jsonl", "runs/straight", "train.save_every=2", "train.keep_last=10", steps=4))
    assert code == 0, out[-2000:]
    _killed_copy(user / "runs/straight", user / "runs/killed", 2, metrics_up_to=3)
    (user / "runs/killed/step-000001").mkdir()  # a step half-deleted by a prune that was killed
    code, out = cli("sft", "-o", "runs/killed", "--resume")  # no model, no data, no overrides
    assert code == 0, out[-2000:]
    assert same_weights(weights(user / "runs/straight/step-000004"), weights(user / "runs/killed/step-000004"))
    steps = [json.loads(x)["step"] for x in (user / "runs/killed/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "metrics.jsonl repeats or skips steps after the resume"
    assert not (user / "runs/killed/step-000001").exists(), "the half-deleted step was never pruned"
    assert (user / "runs/killed/recipe.yaml").read_bytes() == (user / "runs/straight/recipe.yaml").read_bytes()


def test_resume_refuses_a_changed_recipe_or_data_naming_what_differs(user, tiny_dir):
    student = tiny_dir / "student"
    code, out = cli(*sft_args(student, "train.jsonl", "runs/a", "train.save_every=1"))
    assert code == 0, out[-2000:]
    line = refused(["sft", "-o", "runs/a", "--resume", "optim.lr=1e-2", "train.max_steps=3"], "optim.lr", user)
    assert "train.max_steps" in line and "0.001 → 0.01" in line
    refused(["distill", "-o", "runs/a", "--resume", "--method", "kd", "--teacher", tiny_dir / "teacher"],
            "method.name", user)
    # more steps: only with --extend, and only when the schedule does not depend on max_steps (cosine does)
    refused(["sft", "-o", "runs/a", "--resume", "--max-steps", 3], "--extend allows", user)
    refused(["sft", "-o", "runs/a", "--resume", "--extend", "--max-steps", 3], "cosine schedule", user)
    with open(user / "train.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "new row", "output": "changed data"}) + "\n")
    refused(["sft", "-o", "runs/a", "--resume", "--max-steps", 2], "data.train", user)


def test_extend_a_constant_schedule_is_recorded(user, tiny_dir):
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", "optim.schedule=constant"))
    assert code == 0, out[-2000:]
    code, out = cli("sft", "-o", "runs/a", "--resume", "--extend", "--max-steps", 3)
    assert code == 0, out[-2000:]
    meta = json.loads((user / "runs/a/step-000003/meta.json").read_text())
    assert meta["extended"] == [{"from": 2, "to": 3, "at_step": 2}]
    assert "max_steps: 3" in (user / "runs/a/recipe.yaml").read_text()


def test_resume_with_a_student_of_another_shape(user, tiny_dir, tmp_path):
    from tests.tiny import make_llama

    student = user / "my-student"
    shutil.copytree(tiny_dir / "student", student)
    code, out = cli(*sft_args(student, "train.jsonl", "runs/a", "optim.schedule=constant"))
    assert code == 0, out[-2000:]
    shutil.rmtree(student)
    make_llama(student, tiny_dir / "tokenizer", layers=2, hidden=48, seed=3)  # same path, other shape
    refused(["sft", "-o", "runs/a", "--resume", "--extend", "--max-steps", 3], "does not match the student", user)


# ----------------------------------------------------------------------------------- 3. lock
@pytest.mark.slow
def test_one_process_owns_a_run_directory(user, tiny_dir, tiny_data):
    base = [sys.executable, "-m", "minillm_cli.cli", *map(str, sft_args(tiny_dir / "student", "train.jsonl", "runs/a",
                                                                   "train.save_every=1", steps=2000))]
    first = subprocess.Popen(base, cwd=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (user / "runs/a/latest").exists():
            time.sleep(0.05)
        assert (user / "runs/a/latest").exists(), "the first run did not start"
        second = subprocess.run(base, cwd=user, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        line = error_line(second.stderr)
        assert "in use by another minillm process" in line and f"pid {first.pid}" in line
        resumed = subprocess.run([*base, "--resume"], cwd=user, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 2 and f"pid {first.pid}" in resumed.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves the lock file, but not the lock: the run can be taken over at once
    claim = rundir.claim(user / "runs/a", resume=True, overwrite=False)
    claim.release()


# ------------------------------------------------------------------------------- 4. damaged files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_weights_are_named(user, tiny_dir):
    student, teacher = user / "student", user / "teacher"
    shutil.copytree(tiny_dir / "student", student)
    shutil.copytree(tiny_dir / "teacher", teacher)
    _truncate(student / "model.safetensors")
    (teacher / "model.safetensors").write_bytes(b"not a safetensors file at all" * 40)
    refused(sft_args(student, "train.jsonl", "runs/a"), ["student/model.safetensors", "truncated"], user)
    refused(["distill", "--teacher", teacher, "--student", tiny_dir / "student", "--data", "train.jsonl", "-o", "runs/b",
             *FAST], ["teacher/model.safetensors", "not a safetensors file"], user)
    refused(["eval", student, "--data", "train.jsonl", "--max-samples", 2], "student/model.safetensors", user)
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", steps=1))
    assert code == 0, out[-2000:]
    _truncate(user / "runs/a/step-000001/model.safetensors")
    refused(["export", "runs/a", "--out", "exported"], "step-000001/model.safetensors", user)
    refused(["eval", "runs/a", "--data", "train.jsonl", "--max-samples", 2], "step-000001/model.safetensors", user)


def test_resume_falls_back_to_the_last_intact_step(user, tiny_dir):
    student = tiny_dir / "student"
    args = sft_args(student, "train.jsonl", "runs/straight", "train.save_every=1", "train.keep_last=10",
               "optim.schedule=constant", steps=3)
    code, out = cli(*args)
    assert code == 0, out[-2000:]
    _killed_copy(user / "runs/straight", user / "runs/killed", 1, metrics_up_to=2)
    shutil.copytree(user / "runs/straight/step-000002", user / "runs/killed/step-000002")
    write_text_atomic(user / "runs/killed/latest", "step-000002\n")
    _truncate(user / "runs/killed/step-000002/model.safetensors")
    code, out = cli("sft", "-o", "runs/killed", "--resume")
    assert code == 0, out[-2000:]
    assert "skipping damaged checkpoint step-000002 (model.safetensors: truncated" in out
    assert same_weights(weights(user / "runs/straight/step-000003"), weights(user / "runs/killed/step-000003"))


# ------------------------------------------------------------------------- 5. disks and paths
def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@needs_mount
def test_full_disk_is_a_message_and_leaves_no_partial_step(user, tiny_dir):
    disk = user / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # room for the run dir, not for a checkpoint
        before = tree(user)
        code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", disk / "run", steps=1))
        assert code == 2, out[-3000:]
        assert "disk full while saving checkpoint" in error_line(out)
        after = tree(user)
        made = sorted(set(after) - set(before))
        assert all(k.startswith("disk/run") for k in made) and not any(".tmp-" in k for k in made), made
        assert {k: before[k] for k in before} == {k: after[k] for k in before}
    finally:
        subprocess.run(["umount", str(disk)])


@needs_mount
def test_read_only_places_are_messages(user, tiny_dir):
    ro = user / "ro"
    if not _mount_tmpfs(ro, "1m", readonly=True):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        refused(sft_args(tiny_dir / "student", "train.jsonl", ro / "run"), ["cannot create", "ro/run"], user)
        refused(["eval", tiny_dir / "student", "--data", "train.jsonl", "--json", ro / "report.json"],
                ["--json", "not writable"], user)
    finally:
        subprocess.run(["umount", str(ro)])


def test_output_that_is_a_file_and_eval_json_into_a_directory(user, tiny_dir):
    refused(sft_args(tiny_dir / "student", "train.jsonl", "notes.txt"), ["notes.txt", "not a directory"], user)
    (user / "reports").mkdir()
    refused(["eval", tiny_dir / "student", "--data", "train.jsonl", "--json", "reports"], ["--json", "directory"], user)


def test_a_failed_setup_removes_the_directories_it_made(user, tiny_dir):
    refused(sft_args(tiny_dir / "student", "missing.jsonl", "deep/new/run"), "missing.jsonl", user)


# ------------------------------------------------------------------------ 6. non-finite values
@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=1e999", "rollout.temperature=inf", "optim.lr=.nan",
                                      "optim.lr=-inf"])
def test_non_finite_numbers_are_refused(user, tiny_dir, override):
    key = override.split("=")[0]
    refused([*sft_args(tiny_dir / "student", "train.jsonl", "runs/a"), override], [key, "finite"], user)


def test_an_overflowing_learning_rate_stops_without_saving(user, tiny_dir):
    before = tree(user)
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", "optim.lr=1e39", "optim.grad_clip=null",
                         "optim.warmup_steps=0", "optim.schedule=constant", steps=1))
    assert code == 1, out[-2000:]
    assert "optim.lr=1e+39 is far too large" in error_line(out)
    assert not list_steps(user / "runs/a")
    assert {k: v for k, v in tree(user).items() if k in before} == before


def test_weights_that_become_non_finite_are_not_saved(user, tiny_dir, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):  # an update that leaves a NaN in the weights, as a diverging run would
        out = real_step(self, *a, **k)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", steps=1))
    assert code == 1, out[-2000:]
    assert "weights are no longer finite" in error_line(out)
    assert not list_steps(user / "runs/a")


# --------------------------------------------------------------------------- 7. odd data rows
def test_lone_surrogate_in_a_data_row(user, tiny_dir):
    (user / "bad.jsonl").write_text('{"instruction": "say hi \\ud83d", "output": "hi"}\n')
    refused(sft_args(tiny_dir / "student", "bad.jsonl", "runs/a"), ["bad.jsonl:1", "lone surrogate"], user)


# ---------------------------------------------------------------------------- 8. rich markup
def test_brackets_in_messages_survive(user, tiny_dir):
    refused(sft_args(tiny_dir / "student", "train[v2].jsonl", "runs/a"), "train[v2].jsonl", user)
    (user / "cols.jsonl").write_text('{"foo": "a", "bar": "b"}\n')
    refused(sft_args(tiny_dir / "student", "cols.jsonl", "runs/a"), "columns [bar, foo]", user)
    (user / "slash.csv").write_text("/x,y\n1,2\n")
    refused(sft_args(tiny_dir / "student", "slash.csv", "runs/a"), "columns [/x, y]", user)


# ---------------------------------------------------------------------------------- 9. smaller
def test_a_failure_after_setup_does_not_block_the_rerun(user, tiny_dir):
    args = ["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", "train.jsonl",
            "-o", "runs/a", "--max-steps", 1, *FAST, "method.max_new_tokens=4", "rollout.batch_size=4"]
    code, out = cli(*args, "method.num_rollouts=2")  # fewer rollouts than one step needs
    assert code == 2 and "method.num_rollouts" in error_line(out)
    code, out = cli(*args, "method.num_rollouts=4")  # the same -o, no --overwrite
    assert code == 0, out[-2000:]


@pytest.mark.slow
def test_stop_during_the_first_step_says_there_is_nothing_to_resume(user, tiny_dir):
    args = [sys.executable, "-m", "minillm_cli.cli", "distill", "--teacher", str(tiny_dir / "teacher"), "--student",
            str(tiny_dir / "student"), "--data", "train.jsonl", "-o", "runs/a", "--max-steps", "1", *FAST,
            "method.max_new_tokens=200", "method.num_rollouts=64", "rollout.batch_size=4"]
    proc = subprocess.Popen(args, cwd=user, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (user / "runs/a/recipe.yaml").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "nothing to resume" in out and "--resume" not in out.split("SIGINT")[-1]
    assert not list_steps(user / "runs/a")
    code, out = cli("distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data",
                    "train.jsonl", "-o", "runs/a", "--max-steps", 1, *FAST, "method.max_new_tokens=4",
                    "method.num_rollouts=4", "rollout.batch_size=4")
    assert code == 0, out[-2000:]


def test_excel_bom_files_are_read(user, tiny_dir):
    rows = (user / "train.jsonl").read_text()
    (user / "bom.jsonl").write_text("\ufeff" + rows, encoding="utf-8")
    (user / "bom.csv").write_text("\ufeffinstruction,output\nWhat is 1 plus 1?,2\nWhat is 2 plus 2?,4\n", encoding="utf-8")
    for name in ("bom.jsonl", "bom.csv"):
        code, out = cli(*sft_args(tiny_dir / "student", name, f"runs/{name}", steps=1))
        assert code == 0, out[-2000:]


def test_duplicate_yaml_keys_are_refused(user, tiny_dir):
    (user / "r.yaml").write_text("method: sft\noptim:\n  lr: 1e-3\noptim:\n  warmup_steps: 0\n")
    refused(["sft", "r.yaml", "--student", tiny_dir / "student", "--data", "train.jsonl"],
            ["r.yaml", "line 4", "duplicate key 'optim'"], user)


def test_missing_model_paths_are_not_hub_fetches(user):
    (user / "models").mkdir()
    refused(sft_args("models/my-student", "train.jsonl", "runs/a"), ["models.student", "no such file or directory"], user)
    line = refused(sft_args("nothere/student", "train.jsonl", "runs/a"), ["models.student", "no such local directory"], user)
    assert "hub" in line


def test_export_overwrite_replaces_only_an_earlier_export(user, tiny_dir):
    code, out = cli(*sft_args(tiny_dir / "student", "train.jsonl", "runs/a", steps=1))
    assert code == 0, out[-2000:]
    (user / "site").mkdir()
    (user / "site" / "index.html").write_text("<html></html>")
    refused(["export", "runs/a", "--out", "site", "--overwrite"], ["not an earlier minillm export", "index.html"], user)
    code, out = cli("export", "runs/a", "--out", "dist")
    assert code == 0, out[-2000:]
    code, out = cli("export", "runs/a", "--out", "dist", "--overwrite", "--dtype", "fp16")
    assert code == 0, out[-2000:]


def test_a_sampler_cut_with_minillm_is_refused_before_anything_is_written(user, tiny_dir):
    refused(["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", "train.jsonl",
             "-o", "runs/a", "rollout.top_k=2"], "rollout.top_k", user)
