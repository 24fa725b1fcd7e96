"""Live KD against KD from a teacher cache (`minillm teacher-cache`, `data.teacher_cache`).

One invocation, every phase in its own subprocess (so each peak RSS belongs to that phase alone):

    build    `minillm teacher-cache`: the teacher once over the training rows, top-K log-probs to disk
    live     `minillm distill method.name=kd` with the teacher loaded (full-vocabulary divergence)
    cached   the same run with `data.teacher_cache` and no teacher (top-K + tail-bucket divergence)

and prints: the cache's build time and size on disk (and bytes per response token), per training
side the median s/step (the loop's own `step_time`, first step excluded) and the peak RSS of the
process (`os.wait4`), and how far the cached student ends from the live one after the same steps:
the mean per-token KL[live ‖ cached] on the first `--kl-rows` training rows' responses
(teacher-forced), next to the distance either moved from the initial student, KL[live ‖ initial].

Usage (from the repository root):

    python bench/teacher_cache.py --data ../shared/data/instruct-dev.jsonl --examples 512 --steps 20
    python bench/teacher_cache.py --smoke        # tiny models built in-process, seconds

Defaults: teacher `smollm2-135m-instruct`, student = the teacher pruned to `--keep` 8 layers (built
once into minillm's cache), forward KL, kd_ratio 0.5, lr 1e-5 constant, 8 rows per step, rows cut to
256 tokens, K = 64 fp16, fp32 training on the CPU with `--threads` 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_model_options, minillm_command, offline_env, run_measured  # noqa: E402


def run_phase(name: str, cli_args: list[str], threads: int, log_dir: Path) -> dict[str, float]:
    """`minillm CLI_ARGS` in a fresh process: its wall time and peak RSS (MiB)."""
    return run_measured(name, minillm_command(*cli_args), offline_env(threads), log_dir / f"{name}.log")


def step_seconds(run: Path) -> float:
    """Median `step_time` of a run's logged steps, the first (warm-up) excluded when there are more."""
    times = [r["step_time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "step_time" in r]
    return statistics.median(times[1:] if len(times) > 1 else times)


def students_kl(live: Path, cached: Path, initial: Path, data: str, tokenizer_dir: Path, rows: int,
                recipe_overrides: list[str]) -> dict[str, float]:
    """Mean per-token KL[live ‖ cached] and KL[live ‖ initial] on the responses of the first `rows` training rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from minillm_cli.config.loading import load_recipe
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.losses import divergences
    from minillm_cli.methods.batching import response_logits
    from minillm_cli.models import loading as models_mod

    recipe, _ = load_recipe(None, recipe_overrides, {"data.train": data})
    tok = models_mod.load_tokenizer(tokenizer_dir)
    train, _, _, _ = data_mod.prepare_datasets(recipe.data, tok, recipe.train.seed, lambda s: None)
    load = {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in
            (("live", live), ("cached", cached), ("initial", initial))}
    sums = {"cached": 0.0, "initial": 0.0}
    count = 0
    with torch.no_grad():
        for i in range(0, min(rows, len(train)), 8):
            b = data_mod.collate_pairs(train[i : min(i + 8, rows)], tok.pad_token_id)
            ref = response_logits(load["live"], b)  # (B, T, V): KL from the live student's distribution
            for other in sums:
                kl = divergences.forward_kl(response_logits(load[other], b), ref, b["response_mask"])
                sums[other] += float(kl.sum())
            count += int(b["response_mask"].sum())
    return {f"kl_live_{k}": v / max(count, 1) for k, v in sums.items()}


def approximation(teacher: str, students: dict[str, Path], data: str, tokenizer_dir: Path, rows: int, ks: list[int],
                  recipe_overrides: list[str]) -> dict[str, Any]:
    """How well the cached (top-k + tail) divergence stands in for the live one, per student and k:
    the relative error of the summed divergence (live − cached) / live, and the cosine between the
    two gradients with respect to the student's logits (what training follows), on the first `rows`
    training rows' responses, log-probs stored in fp16 as the cache does."""
    import torch
    from transformers import AutoModelForCausalLM

    from minillm_cli.config.loading import load_recipe
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.losses import divergences, sparse
    from minillm_cli.methods.batching import response_logits
    from minillm_cli.models import loading as models_mod

    recipe, _ = load_recipe(None, recipe_overrides, {"data.train": data})
    tok = models_mod.load_tokenizer(tokenizer_dir)
    train, _, _, _ = data_mod.prepare_datasets(recipe.data, tok, recipe.train.seed, lambda s: None)
    b = data_mod.collate_pairs(train[:rows], tok.pad_token_id)
    mask = b["response_mask"]
    with torch.no_grad():
        t = response_logits(AutoModelForCausalLM.from_pretrained(models_mod.resolve_model(teacher)).eval(), b)
    out: dict[str, Any] = {}
    for name, path in students.items():
        with torch.no_grad():
            s0 = response_logits(AutoModelForCausalLM.from_pretrained(path).eval(), b, vocab=None)
        for loss in ("forward_kl", "reverse_kl"):
            s = s0.clone().requires_grad_(True)
            live = getattr(divergences, loss)(s, t[..., : s.shape[-1]], mask).sum()
            (g_live,) = torch.autograd.grad(live, s)
            for k in ks:
                ids, logp, tail = sparse.teacher_top_k(t[..., : s.shape[-1]], k, mask)
                cached = sparse.sparse_divergence(s, ids, logp.half(), tail, mask, loss=loss).sum()
                (g,) = torch.autograd.grad(cached, s)
                cos = torch.nn.functional.cosine_similarity(g.flatten(), g_live.flatten(), dim=0)
                lv, cv = float(live.detach()), float(cached.detach())
                out[f"{name}/{loss}/k={k}"] = {"rel_error": (lv - cv) / lv, "grad_cos": float(cos),
                                               "live_per_token": lv / int(mask.sum())}
    return out


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def smoke_inputs(root: Path) -> tuple[Path, Path, Path]:
    """Tiny tokenizer, teacher and student (tests/tiny.py) and 24 rows of data, built in `root`."""
    sys.path.insert(0, str(REPO))
    from tests.tiny import make_llama, make_tokenizer

    make_tokenizer(root / "tokenizer")
    make_llama(root / "teacher", root / "tokenizer", layers=4, hidden=64, seed=1)
    make_llama(root / "student", root / "tokenizer", layers=2, hidden=32, seed=2)
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."}
            for a in range(6) for b in range(4)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "teacher", root / "student", data


def resolve_student(args: argparse.Namespace) -> Path:
    """--student, or the teacher pruned to --keep layers (built once into minillm's model cache)."""
    if args.student is not None:
        return Path(args.student)
    from minillm_cli.config.loading import load_recipe
    from minillm_cli.train import prepare

    recipe, _ = load_recipe(None, [f"models.student_init={{from: teacher, keep: {args.keep}}}"],
                            {"models.teacher": args.teacher})
    return prepare.resolve_models(recipe, print)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, "instruction jsonl (training rows)")
    p.add_argument("--examples", type=int, default=512, help="training rows (data.max_train_samples)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per training side")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--max-total-tokens", type=int, default=256, help="data.max_total_tokens")
    p.add_argument("--top-k", type=int, default=64, help="teacher ids per position in the cache")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="cache storage dtype")
    p.add_argument("--kl-rows", type=int, default=64, help="rows on which the two students are compared")
    p.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps (checks the script)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    if args.smoke:
        teacher, student, data = smoke_inputs(work / "inputs")
        args.teacher, args.student, args.data = str(teacher), str(student), str(data)
        args.examples, args.steps, args.batch, args.top_k, args.kl_rows = 24, 3, 4, 8, 24
        args.max_total_tokens = 64
    student = resolve_student(args)
    common = ["method.name=kd", f"data.max_train_samples={args.examples}", "data.dev_fraction=0",
              f"data.max_total_tokens={args.max_total_tokens}", f"data.max_prompt_tokens={args.max_total_tokens // 2}",
              f"train.batch_size={args.batch}", f"train.threads={args.threads}", "optim.lr=1e-5",
              "optim.schedule=constant", "optim.warmup_steps=0", "train.log_every=1", "models.dtype=fp32",
              "models.device=cpu"]
    cache = work / "cache"
    build = run_phase("build", ["teacher-cache", "--teacher", args.teacher, "--student", str(student), "--data",
                                args.data, "--out", str(cache), "--top-k", str(args.top_k), "--dtype", args.dtype,
                                *common], args.threads, work)
    manifest = json.loads((cache / "manifest.json").read_text())
    train_args = ["distill", "--student", str(student), "--data", args.data, "--max-steps", str(args.steps), *common]
    live = run_phase("live", [*train_args, "--teacher", args.teacher, "-o", str(work / "live")], args.threads, work)
    cached = run_phase("cached", [*train_args, "-o", str(work / "cached"), f"data.teacher_cache={cache}"],
                       args.threads, work)
    last = f"step-{args.steps:06d}"
    kl = students_kl(work / "live" / last, work / "cached" / last, student, args.data, student, args.kl_rows, common)
    ks = sorted({8, 64, args.top_k, 256} if not args.smoke else {4, 8, 32})
    approx = approximation(args.teacher, {"initial": student, "live": work / "live" / last}, args.data, student,
                           min(args.kl_rows, 16), ks, common)
    result: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "cache": {"build_s": build["wall_s"], "build_rss_mib": build["rss_mib"], "disk_bytes": disk_bytes(cache),
                  "tokens": manifest["identity"]["tokens"], "bytes_per_token": manifest["bytes_per_token"]},
        "live": {"s_per_step": step_seconds(work / "live"), "rss_mib": live["rss_mib"], "wall_s": live["wall_s"]},
        "cached": {"s_per_step": step_seconds(work / "cached"), "rss_mib": cached["rss_mib"],
                   "wall_s": cached["wall_s"]},
        **kl,
        "approximation": approx,
        "work_dir": str(work),
    }
    c = result["cache"]
    print(f"teacher cache: built in {c['build_s']:.1f} s (peak RSS {c['build_rss_mib']:.0f} MiB), "
          f"{c['disk_bytes'] / 2**20:.2f} MiB on disk for {c['tokens']} response tokens "
          f"({c['bytes_per_token']} B/token, top-{args.top_k} {args.dtype})")
    print(f"{'side':8} {'s/step':>8} {'peak RSS MiB':>13} {'wall s':>8}")
    for side in ("live", "cached"):
        r = result[side]
        print(f"{side:8} {r['s_per_step']:8.3f} {r['rss_mib']:13.0f} {r['wall_s']:8.1f}")
    print(f"after {args.steps} steps: KL[live ‖ cached] = {kl['kl_live_cached']:.3g} nats/token; "
          f"KL[live ‖ initial] = {kl['kl_live_initial']:.3g} (how far live training moved the student)")
    print("cached divergence vs live (first rows' responses): relative error of the sum, gradient cosine")
    for key, r in approx.items():
        print(f"  {key:28} error {r['rel_error'] * 100:6.1f}%  grad cos {r['grad_cos']:.3f}  "
              f"(live {r['live_per_token']:.3g}/token)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
