"""Multi-process training: start `minillm _train JOB` once per process with accelerate's launcher.

The launching process has resolved and validated the recipe; the job file carries exactly that
recipe to every process, so what trains is what was checked (no command line is rebuilt).
Imported by the CLI: no torch here either.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from minillm_cli.errors import UserError


def accelerate_config_path(name: str) -> Path:
    """A file, or the name of a shipped accelerate config (`fsdp` -> minillm_cli/recipes/accelerate/fsdp.yaml)."""
    from minillm_cli.recipe_loading import RECIPES_DIR

    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / "accelerate" / f"{Path(name).stem}.yaml"
    if shipped.is_file():
        return shipped
    raise UserError(f"--accelerate-config: {name}: no such file (shipped: ddp, fsdp, zero3)")


def check_deepspeed(config: Path, resume: bool) -> None:
    """Refuse a DeepSpeed launch minillm cannot run, before any process starts (one line each).

    DeepSpeed is not installed where minillm's tests run, so ZeRO-3 is untested; it keeps the
    optimizer in its own format, which `Checkpointer.restore` cannot read: no --resume.
    """
    import importlib.util

    import yaml

    try:
        kind = str((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("distributed_type", ""))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--accelerate-config: {config}: unreadable ({e})") from None
    if kind.upper() != "DEEPSPEED":
        return
    if resume:
        raise UserError(f"--resume: DeepSpeed runs ({config.name}) keep the optimizer in DeepSpeed's own format "
                        "and cannot resume yet")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--accelerate-config: {config.name} needs DeepSpeed (pip install deepspeed; untested "
                        "in minillm's test-suite)")


def launch_processes(job: dict[str, Any], num_processes: int | None, accelerate_config: str | None,
                     console: Console) -> int:
    """Run `minillm _train JOB` in several processes with accelerate's launcher; returns its exit status.

    `job` is the resolved, validated recipe (+ its provenance and the resume/extend switches): every
    process trains exactly what this one checked. It goes to a temporary file outside the run
    directory (a run directory holds only the files of rundir.RUN_FILES), removed when the run ends.
    """
    if "LOCAL_RANK" in os.environ:
        raise UserError("--num-processes: this process was already started by a launcher; drop the option")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        path = accelerate_config_path(accelerate_config)
        check_deepspeed(path, bool(job.get("resume")))
        cmd += ["--config_file", str(path)]
    else:
        # accelerate's multi-process (torchrun) launcher; without GPUs every process runs on the CPU
        # and they talk over gloo (`--cpu` would start a single process).
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    with socket.socket() as sock:  # a free rendezvous port, so that concurrent runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="minillm-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        cmd += ["--main_process_port", str(port), "-m", "minillm_cli.cli", "_train", str(job_file)]
        console.print(f"launching: accelerate launch {' '.join(cmd[3:])}", highlight=False, soft_wrap=True)
        return subprocess.call(cmd)
