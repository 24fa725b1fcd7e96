"""`minillm distill|sft --json FILE`: a machine-readable summary of how a run ended, for CI pipelines.

Written on every exit (success, a stop for safety, bad input, an interrupt), atomically, to FILE or
to stdout with `-` (the run's own output then goes to stderr). No torch import: the CLI uses this.

Layout: {"command", "exit_code", "status" (what the code means), "message" (the error line, or null),
"run_dir", "final_step", "checkpoint", "resumable", "wall_s", "tokens_per_s" (mean of the logged
steps' training tokens/s), "last_metrics" (the last logged record), "eval" (the quickstart's report)}.
Run fields are null when the run never got that far.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from minillm_cli.runs import checkpoint as ckpt
from minillm_cli.runs import steps

EXIT_MEANINGS = {
    0: "success",
    1: "stopped for safety: a non-finite loss, gradient or weights (nothing non-finite was saved)",
    2: "bad input or environment: recipe, data, model, flags, paths, disk, or a run directory in use",
    130: "stopped by SIGINT (Ctrl-C)",
    143: "stopped by SIGTERM",
}


def summarize(command: str, exit_code: int, message: str | None, run_dir: Path | None, wall_s: float) -> dict[str, Any]:
    """The summary of one command invocation (run fields from `run_dir` when it exists)."""
    out: dict[str, Any] = {
        "command": command, "exit_code": exit_code,
        "status": EXIT_MEANINGS.get(exit_code, f"exit code {exit_code}"), "message": message,
        "run_dir": None, "final_step": None, "checkpoint": None, "resumable": False, "wall_s": round(wall_s, 2),
        "tokens_per_s": None, "last_metrics": None, "eval": None,
    }
    if run_dir is None or not run_dir.is_dir():
        return out
    out["run_dir"] = str(run_dir)
    records = steps.read_metrics(run_dir)
    speeds = [r["tok_per_s"] for r in records if isinstance(r.get("tok_per_s"), (int, float))]
    out["tokens_per_s"] = round(statistics.fmean(speeds), 2) if speeds else None
    last = next((r for r in reversed(records) if "loss" in r), None)
    out["last_metrics"] = None if last is None else {k: _finite(v) for k, v in last.items()}
    # the quickstart's run dir holds stage runs: its result is the distilled student
    step_dir = ckpt.latest_step_dir(run_dir / "distill" if (run_dir / "distill").is_dir() else run_dir)
    if step_dir is not None:
        meta = steps.read_json(step_dir / "meta.json")
        out.update(final_step=meta.get("step"), checkpoint=str(step_dir), resumable=exit_code != 0)
    if (run_dir / "eval.json").is_file():  # the quickstart pipeline's final evaluation
        out["eval"] = str(run_dir / "eval.json")
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN / infinity: such a metric is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write(path: str, summary: dict[str, Any]) -> None:
    """Write the summary to `path` atomically (`-`: stdout)."""
    text = json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_for(command: str, path: str, exit_code: int, message: str | None, run_dir: str | Path | None,
              wall_s: float) -> str | None:
    """Summarize and write; returns the problem (one line) if the summary could not be written."""
    summary = summarize(command, exit_code, message, Path(run_dir) if run_dir else None, wall_s)
    try:
        write(path, summary)
    except OSError as e:
        return f"--json {path}: cannot write ({e.strerror or e})"
    return None
