"""Peak memory of minillm's vocabulary-chunked divergences against a dense formulation, as T grows.

For each configuration (implementation × divergence × T) a fresh subprocess:

  1. allocates the inputs: student logits s (B, T, V) fp32 with requires_grad, teacher logits t
     (B, T, V) fp32 and an all-ones mask (B, T), all written (so their pages are resident);
  2. reads `base` = the process's peak resident set so far (VmHWM, `common.peak_rss_bytes`);
  3. runs the divergence forward and `.sum().backward()` once (this creates s.grad, B·T·V fp32);
  4. reads `peak` (VmHWM) again and reports `extra = peak − base − bytes(s.grad)`:
     the peak bytes above "logits + teacher logits + the logits' gradient", i.e. what the
     divergence itself needs on top of tensors that any implementation must hold.

VmHWM is the kernel's high-water mark of resident pages (KiB granularity), so `extra` counts every
temporary the forward and backward allocate and touch. The children run with
`MALLOC_MMAP_THRESHOLD_=65536`: glibc then serves every allocation above 64 KiB with its own mmap and
unmaps it on free, so the peak follows the live tensors (with glibc's default, freed (B, chunk, V)
blocks stay in its heap and the RSS also grows with allocator retention). Implementations:

    ours   divergences.reverse_kl / divergences.forward_kl with the default chunk_size (128 positions): the
           (B, chunk, V) fp32 temporaries exist for one chunk at a time, forward and backward.
    dense  the plain formula over the whole tensor with autograd:
           log q = log_softmax(s), log p = log_softmax(t),
           reverse: Σ_v e^{log q} (log q − log p),  forward: Σ_v e^{log p} (log p − log q).

Usage (from the repository root):

    python bench/memory_scaling.py            # V = 49152, T = 128, 512, 2048, B = 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, peak_rss_bytes  # noqa: E402


def measure(impl: str, loss: str, batch: int, length: int, vocab: int) -> dict[str, float]:
    """Run one configuration in this process (a fresh one: the parent spawns it) and return its figures."""
    import torch

    from minillm_cli.losses import divergences

    torch.manual_seed(0)
    s = torch.randn(batch, length, vocab).requires_grad_()  # (B, T, V)
    t = torch.randn(batch, length, vocab)  # (B, T, V)
    mask = torch.ones(batch, length, dtype=torch.long)
    base = peak_rss_bytes()
    if impl == "ours":
        fn = divergences.reverse_kl if loss == "reverse_kl" else divergences.forward_kl
        div = fn(s, t, mask)  # (B, T)
    else:
        log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)  # (B, T, V) each
        a, b = (log_q, log_p) if loss == "reverse_kl" else (log_p, log_q)
        div = (a.exp() * (a - b)).sum(-1)  # (B, T)
    div.sum().backward()
    peak = peak_rss_bytes()
    logits_bytes = s.numel() * s.element_size()
    assert s.grad is not None
    return {"impl": impl, "loss": loss, "T": length, "V": vocab, "B": batch, "logits_mib": logits_bytes / 2**20,
            "extra_bytes": peak - base - s.grad.numel() * s.grad.element_size(), "value": float(div.detach().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description="peak memory of chunked vs dense divergences (forward + backward)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--lengths", default="128,512,2048", help="comma-separated T values")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        impl, loss, length = args.child.split(":")
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(impl, loss, args.batch, int(length), args.vocab)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for loss in ("reverse_kl", "forward_kl"):
        for length in [int(x) for x in args.lengths.split(",")]:
            for impl in ("ours", "dense"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{impl}:{loss}:{length}",
                       "--vocab", str(args.vocab), "--batch", str(args.batch), "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"B={args.batch}, V={args.vocab}, fp32; extra = peak RSS above logits + teacher logits + logits' gradient")
    print("")
    print("| divergence | T | logits (MiB, each) | ours: extra (MiB) | ours: extra − logits (MiB) "
          "| dense: extra (MiB) | dense: extra / logits |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("reverse_kl", "forward_kl"):
        for length in sorted({r["T"] for r in rows}):
            ours, dense = ({r["impl"]: r for r in rows if r["loss"] == loss and r["T"] == length}[k]
                           for k in ("ours", "dense"))
            mib = ours["logits_mib"]
            print(f"| {loss} | {length} | {mib:.0f} | {ours['extra_bytes'] / 2**20:.1f} | "
                  f"{ours['extra_bytes'] / 2**20 - mib:.1f} | {dense['extra_bytes'] / 2**20:.1f} | "
                  f"{dense['extra_bytes'] / 2**20 / mib:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
