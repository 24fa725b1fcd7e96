"""Process-wide settings that make model work on CPU faster, applied by the commands that run models.

Two settings, both measured by `bench/vs_trl.py` (see bench/RESULTS.md, "CPU process settings"):

1. **glibc keeps freed memory for reuse, inside the training steps** (`keep_freed_memory`). By default glibc returns every allocation above its mmap
   threshold (at most 32 MiB) to the kernel when it is freed, so the next tensor of that size is
   page-faulted in again, 4 KiB at a time, and zeroed by the kernel. A training step allocates and
   frees hundreds of such tensors (logits (B, T, V), the tied embedding's (V, H) gradient, ...): a
   token-level distillation step took about a million minor page faults and 2 s of system time on
   the benchmark's 2-core CPU. `mallopt(M_MMAP_MAX, 0)` serves large blocks from the heap instead
   and a high `M_TRIM_THRESHOLD` keeps freed heap memory in the process, so later steps reuse it.
   The cost: the process keeps its high-water mark of memory while the block runs, so it applies to
   the training loop only: at its end glibc's defaults come back and `malloc_trim(0)` returns the
   free memory, before the next stage of a pipeline loads other models. Only for single-process runs: in a 2-process FSDP run the
   heap fragmented (collective buffers of many sizes) and the peak RSS grew 2.5× over
   `minillm plan`'s estimate (tests/test_fsdp.py), so multi-process runs keep glibc's default.
2. **Grouped-query attention without copies** (`tune_for_cpu`, process-wide). transformers' SDPA path repeats every key/value
   head to the query heads (`repeat_kv`, a copy of the whole KV cache per layer) whenever a mask is
   given and more than one query token is fed, because CUDA kernels would fall back to a slow path
   with `enable_gqa`. On CPU the kernel takes `enable_gqa` with a mask at full speed and the same
   result, so `TRANSFORMERS_SDPA_FORCE_GQA=1` is set (unless the user set it).

`MINILLM_CPU_TUNING=0` in the environment turns both off. No torch import: the CLI stays light.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
"""`mallopt` parameter numbers from glibc's malloc.h (stable ABI)."""

TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory glibc may keep at the top of the heap before returning it to the kernel (1 GiB)."""

DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
"""glibc's own defaults, put back when a block that kept freed memory ends."""

_applied: list[str] | None = None


def _enabled(device_type: str) -> bool:
    return device_type == "cpu" and os.environ.get("MINILLM_CPU_TUNING", "1") != "0"


def _glibc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_for_cpu(device_type: str) -> list[str]:
    """Apply the process-wide CPU setting (grouped-query attention without copies) when `device_type`
    is "cpu"; return what is in effect. Idempotent; `MINILLM_CPU_TUNING=0` turns it off."""
    global _applied
    if not _enabled(device_type):
        return []
    if _applied is None:
        on = os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1") == "1"
        _applied = ["SDPA grouped-query attention without key/value copies"] if on else []
    return _applied


@contextmanager
def keep_freed_memory(device_type: str, processes: int = 1) -> Iterator[bool]:
    """Inside the block, glibc keeps freed memory for reuse (setting 1 above); when it ends, glibc's
    defaults are back and the free memory goes back to the kernel (`malloc_trim`), so that the next
    stage of a pipeline (another model, the evaluation) does not start from this one's high-water mark.

    Yields whether the setting is in effect: only on CPU, in a single-process run, under glibc, and
    unless `MINILLM_CPU_TUNING=0`.
    """
    libc = _glibc() if _enabled(device_type) and processes == 1 else None
    try:
        ok = libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    except AttributeError:
        ok = False
    try:
        yield ok
    finally:
        if ok and libc is not None:
            libc.mallopt(_M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


def give_back_free_memory(device_type: str) -> None:
    """Return the process's free heap memory to the kernel now (`malloc_trim`): before a one-off large
    allocation (a checkpoint being written) inside a `keep_freed_memory` block. A no-op off glibc / CPU."""
    libc = _glibc() if _enabled(device_type) else None
    if libc is not None:
        libc.malloc_trim(0)
