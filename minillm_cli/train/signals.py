"""Ctrl-C / SIGTERM as a request to stop cleanly: the training loop and the teacher-cache build.

The first signal is recorded and the work stops at its next safe point (after a checkpoint, or
after the last complete shard); a second one exits at once. Both writers rename complete files
into place, so exiting mid-write leaves only a temporary name behind.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any


class StopSignals:
    """First SIGINT/SIGTERM: `requested()` turns true; a second: `os._exit(128 + signum)`."""

    def __init__(self, repeat_grace: float = 0.0) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        # Under a launcher (torchrun) a Ctrl-C reaches each process twice, from the terminal and
        # forwarded by the launcher: a repeat within `repeat_grace` seconds is the same request.
        self.repeat_grace = repeat_grace
        self._first_at = 0.0

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and time.monotonic() - self._first_at < self.repeat_grace:
            return
        if self.received is not None:
            os._exit(128 + signum)  # files are written under a temporary name and renamed: nothing corrupts
        self.received = signum
        self._first_at = time.monotonic()

    def requested(self) -> bool:
        return self.received is not None

    def check(self) -> None:
        """Raise KeyboardInterrupt once a stop was requested (for loops that unwind by exception)."""
        if self.received is not None:
            raise KeyboardInterrupt
