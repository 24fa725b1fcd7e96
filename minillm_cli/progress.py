"""Progress reporting: a rich live view on a terminal, plain lines otherwise (the first and last step
and about one per tenth of the run), and always `metrics.jsonl` in the run directory (one JSON object
per logged step or eval)."""

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
        # Plain lines (no terminal): the first and last step and about one per tenth of the run, so
        # that a piped log stays short; every step is in metrics.jsonl all the same.
        self._every = max(1, math.ceil((total_steps - start_step) / 10))

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
        elif (step - self.start_step) % self._every == 0 or step in (self.start_step + 1, self.total) or any(
                k.startswith("dev/") for k in metrics):
            parts = [f"step {step}/{self.total}"] + [f"{k}={_fmt(metrics[k])}" for k in SHOWN if k in metrics]
            parts += [f"{k}={_fmt(v)}" for k, v in metrics.items() if k.startswith("dev/")]
            parts.append(f"elapsed={_duration(time.time() - self.t0)} eta={_duration(self._eta())}")
            self.console.print(" ".join(parts), highlight=False, markup=False, soft_wrap=True)
            sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)


PLAIN_LINE_SECONDS = 30.0
"""A `Phase` without a terminal prints at most one progress line this often (besides its first and last)."""


class Phase:
    """Progress of one long phase outside the training loop (SeqKD's teacher answers, eval's
    divergence passes, a GGUF conversion, export verification).

    On a terminal (`console.is_terminal`): a rich bar with done/total, elapsed time and ETA (a
    spinner with elapsed time when `total` is None), removed when the phase ends. Otherwise, or
    without a console: plain lines through `say` — a first one, then at most one per tenth of the
    work and per PLAIN_LINE_SECONDS, each with the elapsed time and an ETA, and a last line with the
    phase's time (a short phase prints two lines).

        with Phase("seqkd: teacher answers", len(prompts), "prompts", console, say) as phase:
            for batch in ...: ...; phase.advance(len(batch))
    """

    def __init__(self, label: str, total: int | None, unit: str, console: Console | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.console = console
        self.say = say or (lambda s: None)
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self._next_line = 0.1  # fraction of the work after which the next plain line is printed
        self.t0 = self._last_line = time.time()

    def __enter__(self) -> Phase:
        self.t0 = self._last_line = time.time()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = ([SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()] if self.total is None
                       else [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn(self.unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()])
            self._bar = Progress(*columns, console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        else:
            self.say(f"{self.label}: started" + (f" ({self.total} {self.unit})" if self.total is not None else ""))
        return self

    def advance(self, n: int = 1) -> None:
        """`n` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        if (self.total and self.done / self.total >= self._next_line and self.done < self.total
                and time.time() - self._last_line >= PLAIN_LINE_SECONDS):
            self._last_line = time.time()
            elapsed = time.time() - self.t0
            eta = elapsed * (self.total - self.done) / max(self.done, 1)
            self.say(f"{self.label}: {self.done}/{self.total} {self.unit} (elapsed {_duration(elapsed)}, "
                     f"eta {_duration(eta)})")
            while self._next_line <= self.done / self.total:
                self._next_line += 0.1

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc_type is None:
            count = f"{self.done} {self.unit} " if self.total is not None else ""
            self.say(f"{self.label}: {count}done in {_duration(time.time() - self.t0)}")
