"""Multi-process training: start `minillm _train JOB` once per process with accelerate's launcher.

Three processes take part, and each keeps the single-process promises:

- the launching `minillm distill|sft` (`check_before_launch`, `launch_processes`) checks everything it
  can before any process starts (the accelerate config, the number of processes against the
  machine, recipe / launch combinations, a resume against its checkpoint), writes the validated
  recipe to a job file, starts the launcher in its own session and, on SIGINT / SIGTERM, hands the
  signal to the workers (they stop at their next safe point with a resumable checkpoint) and waits
  for them: no orphan, no job file left behind, and the workers' exit code and error line are its own;
- the launcher (`python -m minillm_cli.launch ARGS`, `agent`) is accelerate's `launch`, with the
  torch elastic agent's traceback and logging replaced by the workers' own exit code, and set to
  receive SIGTERM if the launching process dies (Linux);
- the workers train exactly the recipe the launching process checked (no command line is rebuilt);
  rank 0 writes its exit code and error line to the status file (`MINILLM_STATUS_FILE`).

Imported by the CLI: no torch at module level.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from minillm_cli.errors import UserError
from minillm_cli.parallel.launch_config import (
    AccelerateConfig,
    check_combination,
    check_processes,
    read_accelerate_config,
    visible_devices,
)

if TYPE_CHECKING:
    from minillm_cli.config.schema import Recipe

STATUS_ENV = "MINILLM_STATUS_FILE"
"""Where rank 0 of a launched run writes {"code", "message"} when it ends with an error or a stop."""
JOB_DIR_ENV = "MINILLM_JOB_DIR"
"""The job's temporary directory: the launcher removes it if the launching process was killed."""


def accelerate_config_path(name: str) -> Path:
    """A file, or the name of a shipped accelerate config (`fsdp` -> recipes/accelerate/fsdp.yaml)."""
    from minillm_cli.config.loading import RECIPES_DIR

    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"--accelerate-config: {name}: is a directory; give an accelerate config file")
    shipped = RECIPES_DIR / "accelerate" / f"{Path(name).stem}.yaml"
    if shipped.is_file():
        return shipped
    raise UserError(f"--accelerate-config: {name}: no such file (shipped: ddp, fsdp, zero3)")


def check_before_launch(recipe: Recipe, num_processes: int | None, accelerate_config: str | None, *,
                        resume: bool, extend: bool) -> tuple[int, AccelerateConfig | None]:
    """Everything a multi-process run can check before any process starts.

    Returns:
        The number of processes, and the read accelerate config (None: plain data parallel).

    Raises:
        UserError: the accelerate config, too many processes for this machine, a recipe / launch
            combination the loop refuses, DeepSpeed missing, or a resume whose checkpoint or
            recipe does not match — one line each.
    """
    import importlib.util

    if "LOCAL_RANK" in os.environ:
        raise UserError("--num-processes: this process was already started by a launcher; drop the option")
    config = read_accelerate_config(accelerate_config_path(accelerate_config)) if accelerate_config else None
    world = num_processes or (config.num_processes if config is not None else None) or 1
    check_processes(world, *visible_devices())
    kind = config.distributed_type if config is not None else "MULTI_GPU"
    deepspeed = kind == "DEEPSPEED"
    check_combination(recipe, world=world, fsdp=kind == "FSDP" and world > 1, deepspeed=deepspeed,
                      zero3=deepspeed and config is not None and config.zero_stage == 3, resume=resume,
                      ds_gradient_clipping=config.gradient_clipping if config is not None else None)
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        assert config is not None
        raise UserError(f"--accelerate-config: {config.path.name} needs DeepSpeed (pip install deepspeed; untested "
                        "in minillm's test-suite)")
    if resume and recipe.output.dir:
        _check_resume(recipe, Path(recipe.output.dir), world, extend)
    return world, config


def _check_resume(recipe: Recipe, run_dir: Path, world: int, extend: bool) -> None:
    """The checks `run_setup` makes of a resume, made once before the processes start."""
    from minillm_cli.runs import checkpoint as ckpt
    from minillm_cli.runs import resume_check, rundir

    if not run_dir.is_dir():
        raise UserError(f"--resume: {run_dir} does not exist (nothing to continue)")
    resume_dir, _ = rundir.resumable_step(run_dir)
    resume_check.check_checkpoint(recipe, resume_dir, resume_check.data_hashes(recipe.data), extend)
    ckpt.check_world_size(resume_dir, world)


def launch_processes(job: dict[str, Any], world: int, config: AccelerateConfig | None,
                     console: Console) -> tuple[int, str | None]:
    """Run `minillm _train JOB` in `world` processes with accelerate's launcher and wait for them.

    `job` is the resolved, validated recipe (+ its provenance and the resume/extend switches): every
    process trains exactly what this one checked. It goes to a temporary directory outside the run
    directory (a run directory holds only the files of rundir.RUN_FILES), removed when the run ends,
    however it ends short of SIGKILL.

    Returns:
        The run's exit code (the workers' own: 0, 1, 2, 130, 143) and rank 0's error line, if any.
    """
    args = ["--num_processes", str(world)]
    if config is not None:
        args += ["--config_file", str(config.path)]
    else:
        # accelerate's multi-process (torchrun) launcher; without GPUs every process runs on the CPU
        # and they talk over gloo (`--cpu` would start a single process).
        args += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with socket.socket() as sock:  # a free rendezvous port, so that concurrent runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="minillm-launch-") as tmp:
        job_file, status_file = Path(tmp) / "job.json", Path(tmp) / "status.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        args += ["--main_process_port", str(port), "-m", "minillm_cli.cli", "_train", str(job_file)]
        console.print(f"launching: accelerate launch {' '.join(args)}", highlight=False, soft_wrap=True)
        # TMPDIR: torch elastic's log directory (`torchelastic_*`, never removed by torch) and any
        # temporary file of the workers go into the job directory and leave with it.
        code = _run_launcher([sys.executable, "-m", "minillm_cli.commands.launch", *args],
                             {STATUS_ENV: str(status_file), JOB_DIR_ENV: tmp, "TMPDIR": tmp})
        try:
            status = json.loads(status_file.read_text(encoding="utf-8"))
            return int(status["code"]), str(status["message"])
        except (OSError, ValueError, KeyError, TypeError):  # rank 0 wrote none: success, or it never started
            return code, None


def _run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Start the launcher in its own session and wait for it; SIGINT / SIGTERM received meanwhile go
    to the workers (each stops at its next safe point; a second signal makes them exit at once)."""
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum: int, frame: Any) -> None:
        workers = _descendants(proc.pid)
        for pid in workers or [proc.pid]:  # no worker yet: the launcher stops before starting them
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In the launcher, before exec: receive SIGTERM when the launching process dies (even by SIGKILL),
    so that its workers are stopped, not orphaned. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _descendants(root: int) -> list[int]:
    """The pids of every process below `root` (from /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def write_status(code: int, message: str) -> None:
    """Rank 0 of a launched run: record how it ended for the launching process (no-op otherwise)."""
    path = os.environ.get(STATUS_ENV)
    if not path or os.environ.get("RANK", "0") != "0":
        return
    try:
        Path(path).write_text(json.dumps({"code": code, "message": message}), encoding="utf-8")
    except OSError:
        pass  # the launching process then reports the launcher's own exit code


def agent(argv: list[str]) -> int:
    """The launcher process: `accelerate launch ARGV`, returning the workers' exit code instead of
    raising the elastic agent's `ChildFailedError` (a traceback of ~40 lines for a one-line error)."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # rank 0 prints the one line that matters
    parent = os.getppid()
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as e:
        failures = sorted(e.failures.items())  # [(rank, ProcessFailure)]
        first = next((f for rank, f in failures if rank == 0), failures[0][1])
        return first.exitcode if first.exitcode >= 0 else 128 - first.exitcode  # killed by signal N: 128 + N
    except subprocess.CalledProcessError as e:  # accelerate's single-process launcher
        return e.returncode if e.returncode >= 0 else 128 - e.returncode
    finally:
        job_dir = os.environ.get(JOB_DIR_ENV)
        if job_dir and os.getppid() != parent:  # the launching process was killed: nobody else will clean up
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(agent(sys.argv[1:]))
