"""`cpu_tuning`: what it changes in a process, measured in fresh subprocesses.

`keep_freed_memory` makes later large allocations reuse memory freed before (few page faults) and,
when the block ends, gives the free memory back (the RSS drops); `tune_for_cpu` sets grouped-query
attention without copies, process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, os, resource, sys
from minillm_cli.models import cpu_tuning

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

applied = cpu_tuning.tune_for_cpu(sys.argv[1])
import torch
faults = []
with cpu_tuning.keep_freed_memory(sys.argv[1], int(sys.argv[2])) as kept:
    for _ in range(8):  # a step's worth of large temporaries (64 + 32 + 16 MiB), touched and freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(16 * 2**20)
        b = torch.ones(8 * 2**20) * 2
        c = a[: 4 * 2**20] + 1
        del a, b, c
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    inside = rss()
after = rss()
print(json.dumps({"applied": applied, "kept": kept, "faults": faults, "gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA"),
                  "rss_inside": inside, "rss_after": after}))
"""


def _probe(device: str, processes: int = 1, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("MINILLM_CPU_TUNING", "TRANSFORMERS_SDPA_FORCE_GQA")}
    out = subprocess.run([sys.executable, "-c", _PROBE, device, str(processes)], capture_output=True, text=True, check=True,
                         env={**full, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_inside_the_block_and_returned_after_it() -> None:
    pages = 112 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # touched per step
    tuned = _probe("cpu")
    assert tuned["kept"] is True and tuned["gqa"] == "1"
    assert tuned["applied"] == ["SDPA grouped-query attention without key/value copies"]
    untuned = _probe("cpu", MINILLM_CPU_TUNING="0")
    assert untuned["kept"] is False and untuned["applied"] == [] and untuned["gqa"] is None
    # glibc's default returns the large blocks to the kernel: every step faults most pages in again.
    assert min(untuned["faults"][2:]) > pages // 4
    # Tuned, later steps mostly reuse the memory freed before (the heap can fragment now and then).
    assert sum(tuned["faults"][2:]) < sum(untuned["faults"][2:]) / 2
    # Inside the block the freed ~112 MiB stay in the process; after it they are given back.
    assert tuned["rss_inside"] - tuned["rss_after"] > 64 * 2**20, tuned


@pytest.mark.slow
def test_cpu_tuning_leaves_other_devices_several_processes_and_a_users_setting_alone() -> None:
    cuda = _probe("cuda")
    assert cuda["applied"] == [] and cuda["gqa"] is None and cuda["kept"] is False
    ranks = _probe("cpu", processes=2)  # multi-process runs keep glibc's default (a sharded run fragmented)
    assert ranks["kept"] is False and ranks["applied"] == ["SDPA grouped-query attention without key/value copies"]
    mine = _probe("cpu", TRANSFORMERS_SDPA_FORCE_GQA="0")
    assert mine["gqa"] == "0" and mine["applied"] == []
