"""What the benchmarks share: the model and data options, the offline environment of a measured
process, and running one measured process (wall time and peak RSS).

Each bench adds its own options after `add_model_options(parser)`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/data/instruct-dev.jsonl"


def add_model_options(p: argparse.ArgumentParser, data_help: str = "instruction jsonl") -> None:
    """--data, --teacher, --student, --keep and --threads, as every bench names them."""
    p.add_argument("--data", default=DEFAULT_DATA, help=data_help)
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher: alias or local dir")
    p.add_argument("--student", default=None, help="student dir (default: the teacher pruned to --keep layers)")
    p.add_argument("--keep", type=int, default=8, help="layers of the pruned student")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def offline_env(threads: int, **extra: str) -> dict[str, str]:
    """The environment of a measured process: offline, `threads` CPU threads, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries
    the RSS a process had before its execve into ru_maxrss, so a process started by a large one
    would report the parent's size."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


# A small process of its own runs the measured command: the command's ru_maxrss then starts from this
# shim's few MiB (see peak_rss_bytes), whatever the size of the bench process that started it.
_SHIM = """
import json, os, subprocess, sys
proc = subprocess.Popen(json.loads(sys.argv[1]))
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[2], "w").write(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def run_measured(name: str, cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `cmd` to its end with its output in `log`: its wall time (s) and peak RSS (MiB); a failure
    ends the bench with the log's tail."""
    import json

    t0 = time.time()
    result = log.with_suffix(".usage.json")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", _SHIM, json.dumps(cmd), str(result)], env=env, stdout=f,
                       stderr=subprocess.STDOUT, cwd=os.getcwd())
    usage = json.loads(result.read_text())
    if usage["code"] != 0:
        raise SystemExit(f"{name} failed (exit {usage['code']}); log {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": time.time() - t0, "rss_mib": usage["maxrss_kb"] / 1024}


def minillm_command(*args: str) -> list[str]:
    """`minillm ARGS` run by this interpreter."""
    return [sys.executable, "-m", "minillm_cli.cli", *args]
