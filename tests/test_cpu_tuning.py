"""`cpu_tuning.tune_for_cpu`: what it changes in a process, measured in fresh subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, os, resource, sys
from minillm_cli import cpu_tuning
applied = cpu_tuning.tune_for_cpu(sys.argv[1], int(sys.argv[2]))
import torch
faults = []
for _ in range(8):  # a step's worth of large temporaries (64 + 32 + 16 MiB), touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(16 * 2**20)
    b = torch.ones(8 * 2**20) * 2
    c = a[: 4 * 2**20] + 1
    del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")}))
"""


def _probe(device: str, processes: int = 1, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("MINILLM_CPU_TUNING", "TRANSFORMERS_SDPA_FORCE_GQA")}
    out = subprocess.run([sys.executable, "-c", _PROBE, device, str(processes)], capture_output=True, text=True, check=True,
                         env={**full, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cpu_tuning_keeps_freed_memory_and_sets_gqa() -> None:
    pages = 112 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # touched per step
    tuned = _probe("cpu")
    assert tuned["applied"] == ["glibc malloc keeps freed memory",
                                "SDPA grouped-query attention without key/value copies"]
    assert tuned["gqa"] == "1"
    untuned = _probe("cpu", MINILLM_CPU_TUNING="0")
    assert untuned["applied"] == [] and untuned["gqa"] is None
    # glibc's default returns the large blocks to the kernel: every step faults most pages in again.
    assert min(untuned["faults"][2:]) > pages // 4
    # Tuned, later steps mostly reuse the memory freed before (the heap can fragment now and then).
    assert sum(tuned["faults"][2:]) < sum(untuned["faults"][2:]) / 2


def test_cpu_tuning_leaves_other_devices_and_a_users_setting_alone() -> None:
    cuda = _probe("cuda")
    assert cuda["applied"] == [] and cuda["gqa"] is None
    ranks = _probe("cpu", processes=2)  # multi-process runs keep glibc's default (a sharded run fragmented)
    assert ranks["applied"] == ["SDPA grouped-query attention without key/value copies"]
    mine = _probe("cpu", TRANSFORMERS_SDPA_FORCE_GQA="0")
    assert mine["gqa"] == "0" and "SDPA grouped-query attention without key/value copies" not in mine["applied"]
