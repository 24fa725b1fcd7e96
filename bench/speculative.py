"""Teacher-mixed rollouts, lockstep against speculative sampling: the rollout alone, repeated.

`bench/vs_trl.py` times whole training steps, where the rollout is one phase among several and each
side runs once. This script times only what `rollout.speculative_tokens` changes: `rollout.sample`
with the teacher mixed in (α = 0.2, T = 1), on the same models and the same prompts in the same
batches as `bench/vs_trl.py`, in one process, every setting once per repeat in an order that
alternates between repeats. Per setting: the median over batches × repeats of the rollout's wall
time per batch, the time per generated token, the teacher forward calls per generated token (Σ over
rows of the teacher forwards run while the row was generating, over the generated tokens; 1 in
lockstep) and the share of drafts accepted. Each setting draws from its own fixed seed per batch:
lockstep and speculative sampling give the same distribution, not the same draws, so the generated
token counts differ a little between settings.

Usage (from the repository root):

    python bench/speculative.py --data ../shared/data/instruct-dev.jsonl --batches 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_model_options  # noqa: E402

sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout batch")
    p.add_argument("--batches", type=int, default=5, help="rollout batches (the first batch × batches prompts)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt")
    p.add_argument("--ks", default="0,3,4,5,6", help="rollout.speculative_tokens values (0 = lockstep)")
    p.add_argument("--alpha", type=float, default=0.2, help="teacher share of the sampling mixture")
    p.add_argument("--repeats", type=int, default=2, help="passes over all settings, order alternating")
    p.add_argument("--forward-costs", action="store_true",
                   help="also time one KV-cached forward of each model over L = 1, 2, 4, 8 new tokens per row")
    p.add_argument("--json", default=None, help="also write the raw records here")
    args = p.parse_args()

    from minillm_cli.models.cpu_tuning import keep_freed_memory, tune_for_cpu

    tune_for_cpu("cpu")  # as minillm's commands do (bench/RESULTS.md, "CPU process settings"),
    keep_freed_memory("cpu").__enter__()  # and as their training loops run: for the whole benchmark
    import torch
    import vs_trl
    from transformers import AutoModelForCausalLM

    from minillm_cli.data import encoding as data_mod
    from minillm_cli.models import loading as models_mod
    from minillm_cli.sampling.rollout import sample

    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = vs_trl.model_dirs(args.teacher, args.student, args.keep)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    tokenizer = models_mod.load_tokenizer(student_dir)
    examples = vs_trl.bench_prompts(args.data, args.batch * args.batches, 0)
    batches = []
    for i in range(0, len(examples), args.batch):
        rows = [data_mod.Encoded(data_mod.encode_prompt(ex, tokenizer, "chat"), [], i + j)
                for j, ex in enumerate(examples[i : i + args.batch])]
        batches.append(data_mod.collate_prompts(rows, tokenizer.pad_token_id))
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    if args.forward_costs:
        print(forward_costs(student, teacher, *batches[0]), flush=True)
    records: list[dict[str, Any]] = []
    with torch.no_grad():
        sample(student, *batches[0], teacher=teacher, alpha=args.alpha, max_new_tokens=4,  # warm-up
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for rep in range(args.repeats):
            for k in (ks if rep % 2 == 0 else ks[::-1]):
                for b, (ids, mask) in enumerate(batches):
                    gen = torch.Generator().manual_seed(1000 * b + k)
                    t0 = time.perf_counter()
                    r = sample(student, ids, mask, teacher=teacher, alpha=args.alpha, max_new_tokens=args.new_tokens,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               generator=gen, keep_teacher_logprobs=True, speculative_tokens=k)
                    records.append({"k": k, "batch": b, "repeat": rep, "seconds": time.perf_counter() - t0,
                                    "tokens": int(r.response_mask.sum()), "teacher_row_calls": r.teacher_row_calls,
                                    "drafts_checked": r.drafts_checked, "drafts_accepted": r.drafts_accepted})
                print(f"  repeat {rep + 1}: k={k} done", flush=True)

    if not records:
        return
    base = None
    lines = ["| rollout.speculative_tokens | s per batch (median) | ms per generated token | vs lockstep "
             "| teacher calls / gen token | drafts accepted |", "|---|---|---|---|---|---|"]
    for k in ks:
        rs = [r for r in records if r["k"] == k]
        per_batch = statistics.median(r["seconds"] for r in rs)
        per_token = sum(r["seconds"] for r in rs) / sum(r["tokens"] for r in rs)
        base = per_token if k == 0 else base
        calls = sum(r["teacher_row_calls"] for r in rs) / sum(r["tokens"] for r in rs)
        checked = sum(r["drafts_checked"] for r in rs)
        accept = f"{100 * sum(r['drafts_accepted'] for r in rs) / checked:.1f}%" if checked else "-"
        ratio = f"x{per_token / base:.2f}" if base else "-"
        lines.append(f"| {k}{' (lockstep)' if k == 0 else ''} | {per_batch:.2f} | {1000 * per_token:.1f} | {ratio} | "
                     f"{calls:.3f} | {accept} |")
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "records": records}, indent=1) + "\n")


def forward_costs(student: Any, teacher: Any, ids: Any, mask: Any, repeats: int = 12) -> str:
    """Median wall time of one KV-cached forward over L new tokens per row after the batch's prompt
    (what a lockstep step, L = 1, and a speculative verification, L = k, cost), per model."""
    import torch

    from minillm_cli.sampling.cached_lm import CachedLM

    lines = ["| model | L = 1 | L = 2 | L = 4 | L = 8 |", "|---|---|---|---|---|"]
    B, P = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for name, model in (("student", student), ("teacher", teacher)):
            cells = []
            for L in (1, 2, 4, 8):
                lm = CachedLM(model, torch.device("cpu"))
                lm.step(ids, mask, pos)
                cols, times = mask, []
                start = mask.sum(-1, keepdim=True)  # (B, 1) the next position of each row
                for r in range(repeats):
                    x = torch.randint(100, 40000, (B, L))
                    cols = torch.cat([cols, cols.new_ones(B, L)], dim=1)
                    positions = start + r * L + torch.arange(L)
                    t0 = time.perf_counter()
                    lm.step(x, cols, positions) if L == 1 else lm.step_all(x, cols, positions)
                    times.append(time.perf_counter() - t0)
                cells.append(f"{1000 * statistics.median(times):.0f} ms")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
