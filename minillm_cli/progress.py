"""Progress reporting: a rich live view on a terminal, one plain line per log interval otherwise,
and always `metrics.jsonl` in the run directory (one JSON object per logged step or eval)."""

from __future__ import annotations

import errno
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from minillm_cli.errors import UserError

# Metrics shown in the live view / plain lines, in this order, when present.
SHOWN = ("loss", "lr", "reward", "rkl", "pg_loss", "reg_loss", "pt_loss", "clip_frac", "resp_len", "tok_per_s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Writes metrics.jsonl and shows progress; use as a context manager around the loop."""

    def __init__(self, run_dir: Path, total_steps: int, title: str, console: Console, start_step: int = 0,
                 enabled: bool = True, on_log: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        self.on_log = on_log
        """Also called with every logged record (the experiment trackers)."""
        self.path = run_dir / "metrics.jsonl"
        self.total = total_steps
        self.title = title
        self.console = console
        self.enabled = enabled  # False on non-main ranks: nothing printed, nothing written
        self.live_mode = enabled and console.is_terminal
        self.start_step = start_step
        self.t0 = time.time()
        self.last: dict[str, Any] = {}
        self.step = start_step
        self._live: Live | None = None

    def __enter__(self) -> "Progress":
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def _eta(self) -> float:
        done = self.step - self.start_step
        if done <= 0:
            return math.inf
        return (time.time() - self.t0) / done * (self.total - self.step)

    def _render(self) -> Table:
        table = Table(title=f"{self.title}  step {self.step}/{self.total}", show_header=True, expand=False)
        keys = [k for k in SHOWN if k in self.last] + [k for k in sorted(self.last) if k.startswith("dev/")]
        for k in ["elapsed", "eta", *keys]:
            table.add_column(k, justify="right")
        row = [_duration(time.time() - self.t0), _duration(self._eta())] + [_fmt(self.last[k]) for k in keys]
        table.add_row(*row)
        return table

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        """Append one record to metrics.jsonl and refresh the view / print a plain line."""
        if not self.enabled:
            return
        self.step = step
        record = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(f"cannot write {self.path} at step {step}: {what}") from None
        self.last.update(metrics)
        if self.on_log is not None:
            self.on_log(step, metrics)
        if not show:
            return
        if self._live is not None:
            self._live.update(self._render())
        else:
            parts = [f"step {step}/{self.total}"] + [f"{k}={_fmt(metrics[k])}" for k in SHOWN if k in metrics]
            parts += [f"{k}={_fmt(v)}" for k, v in metrics.items() if k.startswith("dev/")]
            parts.append(f"elapsed={_duration(time.time() - self.t0)} eta={_duration(self._eta())}")
            self.console.print(" ".join(parts), highlight=False, markup=False, soft_wrap=True)
            sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)
