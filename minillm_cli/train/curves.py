"""RUN/curves.png: a training run at a glance, redrawn at every checkpoint from metrics.jsonl.

One small panel per quantity against the optimizer step: the loss and the gradient norm for every
method, the dev loss where it was computed, and the method's own quantities (MiniLLM: reward, the
importance-sampled reverse KL estimate, the PPO clip fraction, the rollout length; GKD: the response
length). Drawing never stops a run: without matplotlib (a dependency, but an environment may lack
it) or on any plotting error the run goes on and the caller prints the returned note once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from minillm_cli.runs import steps as run_steps

CURVES = "curves.png"
COMMON = ("loss", "dev/loss", "grad_norm")
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "minillm": ("reward", "rkl", "clip_frac", "resp_len", "pg_loss", "reg_loss"),
    "gkd": ("resp_len",),
}
LABELS = {
    "loss": "training loss", "dev/loss": "dev loss", "grad_norm": "gradient norm (before clipping)",
    "reward": "reward log p − log q (per token)", "rkl": "reverse KL estimate (nats / sequence)",
    "clip_frac": "PPO clip fraction", "resp_len": "response length (tokens)", "pg_loss": "L_pg",
    "reg_loss": "L_reg (single-step reverse KL)",
}


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """Per key with at least one finite value: (steps, values), one point per step (a resumed step's
    last record wins), in step order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in keys:
        by_step = {int(r["step"]): float(r[key]) for r in records
                   if isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float))
                   and math.isfinite(float(r[key]))}
        if by_step:
            steps = sorted(by_step)
            out[key] = (steps, [by_step[s] for s in steps])
    return out


def write_curves(run_dir: Path, method: str) -> str | None:
    """Draw `run_dir/curves.png` (atomically) from its metrics.jsonl; returns a note when it did not."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return f"{run_dir / CURVES} not drawn: plotting needs matplotlib (pip install matplotlib)"
    data = series(run_steps.read_metrics(run_dir), COMMON + METHOD_KEYS.get(method, ()))
    if not data:
        return None  # nothing logged yet
    cols = min(3, len(data))
    rows = math.ceil(len(data) / cols)
    tmp = run_dir / f".tmp-{CURVES}"
    try:
        fig = Figure(figsize=(4.0 * cols, 2.8 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (key, (steps, values)) in enumerate(data.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
            ax.set_title(LABELS.get(key, key), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"minillm {method}: {run_dir.name}", fontsize=10)
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, run_dir / CURVES)
    except Exception as e:  # a figure must never stop or fail a training run
        tmp.unlink(missing_ok=True)
        return f"{run_dir / CURVES} not drawn: {type(e).__name__}: {e}"
    return None
