"""Process-wide settings that make model work on CPU faster, applied by the commands that run models.

Two settings, both measured by `bench/vs_trl.py` (see bench/RESULTS.md, "CPU process settings"):

1. **glibc keeps freed memory for reuse.** By default glibc returns every allocation above its mmap
   threshold (at most 32 MiB) to the kernel when it is freed, so the next tensor of that size is
   page-faulted in again, 4 KiB at a time, and zeroed by the kernel. A training step allocates and
   frees hundreds of such tensors (logits (B, T, V), the tied embedding's (V, H) gradient, ...): a
   token-level distillation step took about a million minor page faults and 2 s of system time on
   the benchmark's 2-core CPU. `mallopt(M_MMAP_MAX, 0)` serves large blocks from the heap instead
   and a high `M_TRIM_THRESHOLD` keeps freed heap memory in the process, so later steps reuse it.
   The cost: the process keeps its high-water mark of memory until it exits; one training process's
   peak RSS rises by a few percent. Only for single-process runs: in a 2-process FSDP run the
   heap fragmented (collective buffers of many sizes) and the peak RSS grew 2.5× over
   `minillm plan`'s estimate (tests/test_fsdp.py), so multi-process runs keep glibc's default.
2. **Grouped-query attention without copies.** transformers' SDPA path repeats every key/value
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

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
"""`mallopt` parameter numbers from glibc's malloc.h (stable ABI)."""

TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory glibc may keep at the top of the heap before returning it to the kernel (1 GiB)."""

_applied: list[str] | None = None


def tune_for_cpu(device_type: str, processes: int = 1) -> list[str]:
    """Apply the CPU settings once per process when `device_type` is "cpu"; return what is in effect.

    `processes`: the run's process count; the malloc setting applies only to a single process.
    Idempotent; does nothing on other devices, outside glibc, or with `MINILLM_CPU_TUNING=0`.
    """
    global _applied
    if device_type != "cpu" or os.environ.get("MINILLM_CPU_TUNING", "1") == "0":
        return []
    if _applied is not None:
        return _applied
    applied = []
    if processes == 1 and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        except (OSError, AttributeError):
            ok = False
        if ok:
            applied.append("glibc malloc keeps freed memory")
    if os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1") == "1":
        applied.append("SDPA grouped-query attention without key/value copies")
    _applied = applied
    return applied
