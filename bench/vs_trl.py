"""Side-by-side benchmark: on-policy reverse-KL distillation with minillm and with TRL.

One invocation runs every side in its own subprocess (so each peak RSS belongs to one side only),
on the same teacher, student, prompts and settings, and prints one table:

    gkd      minillm, `method: gkd` with lmbda=1, beta=1: sample from the student, token-level
             reverse KL over the vocabulary at every generated token (TRL's DistillationTrainer work).
    trl      TRL's `DistillationTrainer` (always on-policy; beta=1 = reverse KL, chunked divergence).
    trl-tuned  the same, in a process given minillm's CPU settings (`minillm_cli.cpu_tuning`: glibc
             keeps freed memory, SDPA grouped-query attention without copies): the like-for-like peer.
    gkd-untuned  the gkd side with those settings off (MINILLM_CPU_TUNING=0): what they gain.
    minillm  minillm, `method: minillm` (teacher-mixed sampling alpha=0.2, single-step reverse KL on,
             ppo_epochs=1, num_rollouts = batch: every generated token is trained on exactly once),
             the default rollout: speculative sampling of the mixture.
    minillm-lockstep   the same with rollout.speculative_tokens=0 (one teacher forward per token);
             `minillm-k<N>` sides set rollout.speculative_tokens=N (a sweep).

Per side: median seconds per optimizer step over the measured steps (after `--warmup` steps), generated
tokens per second, peak RSS, a per-phase profile of the step (minillm sides: also teacher calls per
generated token and the drafts' acceptance rate) and an MFU-style figure (model FLOPs of
the step over the machine's fp32 matmul rate, measured by a child process before and after the
sides: the higher of the two).

Usage (from the repository root; see bench/README.md):

    python bench/vs_trl.py --data ../shared/data/instruct-dev.jsonl --steps 6 --warmup 2

Step time is the wall time between the ends of two consecutive optimizer steps, so everything a
framework does per step (data, logging, bookkeeping) is counted. Peak RSS is read twice: inside the
child right after its last optimizer step (VmHWM, `common.peak_rss_bytes`: the peak of the whole
process so far, loading included, before any final checkpoint is written) and by the parent from
`os.wait4` when the child exits (the peak of the whole process, teardown included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_model_options, offline_env, peak_rss_bytes, run_measured  # noqa: E402

SIDES = ("gkd", "trl", "trl-tuned", "minillm", "minillm-lockstep", "gkd-untuned")
DEFAULT_SIDES = ("gkd", "trl", "trl-tuned", "minillm", "minillm-lockstep")
LABELS = {
    "gkd": "minillm gkd (token-level on-policy reverse KL)",
    "trl": "TRL DistillationTrainer (beta=1)",
    "trl-tuned": "TRL DistillationTrainer (beta=1), with minillm's CPU process settings",
    "gkd-untuned": "minillm gkd, CPU process settings off (MINILLM_CPU_TUNING=0)",
    "minillm": "minillm method=minillm (alpha=0.2, single-step; speculative rollout, default k)",
    "minillm-lockstep": "minillm method=minillm, lockstep rollout (rollout.speculative_tokens=0)",
}


def speculative_side(side: str) -> int | None:
    """`minillm-k<N>`: the minillm side with rollout.speculative_tokens=N (a sweep); else None."""
    if side.startswith("minillm-k") and side[len("minillm-k"):].isdigit():
        return int(side[len("minillm-k"):])
    return None


def label(side: str) -> str:
    k = speculative_side(side)
    return LABELS[side] if k is None else f"minillm method=minillm, rollout.speculative_tokens={k}"


# ------------------------------------------------------------------------------ phase timing
class Phases:
    """Exclusive wall time per named phase, with per-step snapshots.

    `wrap(owner, attr, name)` replaces `owner.attr` by a timed version. Phases may nest (a divergence
    that calls another one, a backward inside a step): time is attributed to the innermost running
    phase only, so the phases of a step add up to at most the step's wall time.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [name, start of the current uninterrupted slice]
        self._last: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.step_ends: list[float] = []

    def _enter(self, name: str) -> None:
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.totals[outer[0]] = self.totals.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])

    def _exit(self) -> None:
        now = time.perf_counter()
        name, start = self._stack.pop()
        self.totals[name] = self.totals.get(name, 0.0) + now - start
        if self._stack:
            self._stack[-1][1] = now

    def timed(self, fn: Callable[..., Any], name: str | Callable[..., str]) -> Callable[..., Any]:
        """`fn` wrapped so that its calls count as phase `name` (or `name(*args, **kwargs)`)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._enter(name(*args, **kwargs) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def wrap(self, owner: Any, attr: str, name: str | Callable[..., str]) -> None:
        setattr(owner, attr, self.timed(getattr(owner, attr), name))

    def end_step(self) -> None:
        """Close a training step: store the phase times accumulated since the previous call."""
        self.step_ends.append(time.perf_counter())
        self.steps.append({k: v - self._last.get(k, 0.0) for k, v in self.totals.items()})
        self._last = dict(self.totals)


def _grad_name(grad: str, no_grad: str) -> Callable[..., str]:
    """Phase name chosen at call time: `grad` when autograd records (the student), else `no_grad`."""
    import torch

    return lambda *a, **k: grad if torch.is_grad_enabled() else no_grad


def _common_hooks(phases: Phases, total_steps: int, out: dict[str, Any]) -> None:
    """Timers shared by all sides: backward, gradient clipping and the optimizer step (AdamW, as on
    both sides), whose end closes a step and, after the last one, records the peak RSS so far."""
    import torch
    from accelerate import Accelerator

    phases.wrap(Accelerator, "backward", "backward")
    phases.wrap(Accelerator, "clip_grad_norm_", "clip grad")
    step = phases.timed(torch.optim.AdamW.step, "optimizer")

    def step_and_mark(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        phases.end_step()
        if len(phases.steps) == total_steps:
            out["rss_train_kb"] = peak_rss_bytes() // 1024
            if torch.cuda.is_available():
                out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        return result

    torch.optim.AdamW.step = step_and_mark  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------- the data
def bench_prompts(data: str, count: int, seed: int) -> list[Any]:
    """The `count` examples of the benchmark, in the order minillm's training loop consumes them.

    minillm reads `data.train` limited to the first `count` rows and draws them through its seeded
    stream (`data.take_indices`); TRL is given the same rows in that same order without shuffling,
    so both sides see the same prompts in the same batches.
    """
    from minillm_cli.data import encoding as data_mod

    examples = data_mod.load_examples(data)[:count]
    if len(examples) < count:
        raise SystemExit(f"--data {data}: {len(examples)} rows, the benchmark needs {count}")
    return [examples[i] for i in data_mod.take_indices(count, seed, 0, count)]


def model_dirs(teacher: str, student: str | None, keep: int) -> tuple[Path, Path]:
    """The teacher directory (any alias minillm resolves) and the student: `student` if given, else a
    `keep`-layer pruned copy of the teacher, built once into minillm's cache."""
    from minillm_cli.models import loading as models_mod
    from minillm_cli.models import student_init

    teacher_dir = models_mod.resolve_model(teacher)
    if student is not None:
        return teacher_dir, models_mod.resolve_model(student)
    out = models_mod.cache_dir() / "students" / f"{teacher_dir.name}-bench-keep{keep}"
    if not (out / "config.json").exists():
        student_init.init_student_from_teacher(teacher_dir, out, keep=keep)
    return teacher_dir, out


# --------------------------------------------------------------------------------- the sides
def run_minillm(args: argparse.Namespace, side: str, out: dict[str, Any]) -> None:
    """One minillm run through the real training loop (`loop.train`), with phase timers installed."""
    import io

    import torch
    from rich.console import Console

    from minillm_cli.config.loading import load_recipe
    from minillm_cli.losses import divergences, logprobs, policy_gradient
    from minillm_cli.methods import batching, minillm
    from minillm_cli.sampling import rollout
    from minillm_cli.train.loop import train

    total = args.warmup + args.steps
    teacher_dir, student_dir = model_dirs(args.teacher, args.student, args.keep)
    phases = Phases()
    _common_hooks(phases, total, out)
    sample = rollout.sample
    gen_tokens: list[int] = []
    sampler = {"teacher_row_calls": 0, "drafts_checked": 0, "drafts_accepted": 0, "tokens": 0}

    def sample_and_count(*a: Any, **k: Any) -> Any:
        roll = sample(*a, **k)
        gen_tokens.append(int(roll.response_mask.sum()))
        for key in ("teacher_row_calls", "drafts_checked", "drafts_accepted"):
            sampler[key] += getattr(roll, key)
        sampler["tokens"] += gen_tokens[-1]
        return roll

    rollout.sample = phases.timed(sample_and_count, "rollout")
    for module in (batching, minillm):  # gkd's forwards run in batching.jsd_backward
        phases.wrap(module, "response_logits", _grad_name("student forward", "teacher forward"))
    phases.wrap(minillm.MiniLlmStepper, "_score_teacher", "teacher forward")
    for module, names in ((divergences, ("generalized_jsd", "reverse_kl")), (logprobs, ("token_logprobs",)),
                          (policy_gradient, ("policy_loss", "advantages"))):
        for name in names:
            phases.wrap(module, name, "loss (fwd)")

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    n = args.batch * total
    overrides = [
        f"train.batch_size={args.batch}", f"train.max_steps={total}", f"train.threads={args.threads}",
        f"train.seed={args.seed}", "train.log_every=1", "data.dev_fraction=0", f"data.max_train_samples={n}",
        # No prompt of the benchmark is cut (TRL does not cut prompts either).
        "data.max_prompt_tokens=2048", "data.max_total_tokens=4096",
        "optim.lr=1e-5", "optim.warmup_steps=0", "optim.schedule=constant", "optim.grad_clip=1.0",
        f"models.dtype={'bf16' if args.device == 'cuda' else 'fp32'}", f"models.device={args.device}",
        f"rollout.batch_size={args.batch}",
    ]
    if side == "gkd":
        overrides += ["method.name=gkd", "method.lmbda=1.0", "method.beta=1.0", f"method.max_new_tokens={args.new_tokens}"]
    else:
        overrides += ["method.name=minillm", "method.teacher_mix=0.2", "method.single_step=true", "method.ppo_epochs=1",
                      f"method.num_rollouts={args.batch}", f"method.max_new_tokens={args.new_tokens}"]
        k = 0 if side == "minillm-lockstep" else speculative_side(side)
        if k is not None:  # else the recipe default
            overrides.append(f"rollout.speculative_tokens={k}")
    flags = {"models.teacher": str(teacher_dir), "models.student": str(student_dir), "data.train": args.data,
             "output.dir": str(run_dir), "output.overwrite": True}
    recipe, source = load_recipe(None, overrides, flags)
    torch.manual_seed(args.seed)
    train(recipe, source, console=Console(file=io.StringIO()))
    out.update(step_ends=phases.step_ends, phases=phases.steps, gen_tokens=gen_tokens, sampler=sampler,
               speculative_tokens=recipe.rollout.speculative_tokens)


def run_trl(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """One TRL DistillationTrainer run on the same models, prompts and settings."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer
    from trl.trainer import distillation_trainer as dt

    total = args.warmup + args.steps
    teacher_dir, student_dir = model_dirs(args.teacher, args.student, args.keep)
    torch.set_num_threads(args.threads)
    phases = Phases()
    _common_hooks(phases, total, out)
    phases.wrap(DistillationTrainer, "_tokenize_prompts", "rollout")
    gen_tokens: list[int] = []
    generate = DistillationTrainer._generate_single_turn

    def generate_and_count(self: Any, *a: Any, **k: Any) -> Any:
        completions = generate(self, *a, **k)
        gen_tokens.append(sum(len(c) for c in completions))
        return completions

    DistillationTrainer._generate_single_turn = phases.timed(generate_and_count, "rollout")
    phases.wrap(DistillationTrainer, "_get_last_hidden_state", _grad_name("student forward", "teacher forward"))
    phases.wrap(dt, "_chunked_divergence_loss", "loss (fwd)")

    examples = bench_prompts(args.data, args.batch * total, args.seed)
    dataset = datasets.Dataset.from_list([{"prompt": ex.messages} for ex in examples])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=1e-5, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=1e-6, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        # The same optimizer implementation as minillm (torch.optim.AdamW), fp32 (TRL defaults to bf16),
        # no activation checkpointing (TRL defaults to it; minillm does not recompute the models).
        optim="adamw_torch", bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        gradient_checkpointing=args.trl_grad_ckpt,
        max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=1.0,
        shuffle_dataset=False, disable_dropout=True, save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.train()
    out.update(step_ends=phases.step_ends, phases=phases.steps, gen_tokens=gen_tokens, trl_version=trl.__version__)


def run_matmul(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The machine's fp32 matmul rate with `--threads` threads: best of 10 (n, n) @ (n, n)."""
    import torch

    torch.set_num_threads(args.threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    out["matmul_flops_per_s"] = 2 * n**3 / best


def model_shape(path: Path) -> dict[str, int]:
    """Parameter counts for the FLOP model: per-token body params (layers + final norm, i.e. all but
    the embedding / output head) and the head's hidden x vocab."""
    cfg = json.loads((path / "config.json").read_text())
    from safetensors import safe_open

    total, embed, head = 0, 0, 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                numel = math.prod(h.get_slice(key).get_shape())
                total += numel
                if "embed_tokens" in key:
                    embed += numel
                elif "lm_head" in key:
                    head += numel
    return {"body": total - embed - head, "head": cfg["hidden_size"] * cfg["vocab_size"], "total": total}


def child(args: argparse.Namespace) -> None:
    """Run one side in this process and write its JSON record to `--out`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"side": args.child}
    t0 = time.perf_counter()
    if args.child == "matmul":
        run_matmul(args, out)
    elif args.child in ("trl", "trl-tuned"):
        from contextlib import nullcontext

        from minillm_cli.models.cpu_tuning import keep_freed_memory, tune_for_cpu

        if args.child == "trl-tuned":
            tune_for_cpu(args.device)  # what minillm's commands do first in their process
        # ... and what minillm's training loop runs inside
        with keep_freed_memory(args.device) if args.child == "trl-tuned" else nullcontext():
            run_trl(args, out)
    else:
        run_minillm(args, args.child.removesuffix("-untuned"), out)
    out["wall_s"] = time.perf_counter() - t0
    if args.child != "matmul":
        teacher_dir, student_dir = model_dirs(args.teacher, args.student, args.keep)
        out["teacher_shape"], out["student_shape"] = model_shape(teacher_dir), model_shape(student_dir)
        out["prompt_tokens"] = prompt_token_counts(args, student_dir)
    Path(args.out).write_text(json.dumps(out))


def prompt_token_counts(args: argparse.Namespace, student_dir: Path) -> list[int]:
    """Real prompt tokens of each step's batch (the same on every side: same prompts, same template)."""
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.models import loading as models_mod

    tokenizer = models_mod.load_tokenizer(student_dir)
    examples = bench_prompts(args.data, args.batch * (args.warmup + args.steps), args.seed)
    counts = [len(data_mod.encode_prompt(ex, tokenizer, "chat")) for ex in examples]
    return [sum(counts[i : i + args.batch]) for i in range(0, len(counts), args.batch)]


# ----------------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """Run `side` in a fresh subprocess; its record plus the child's own peak RSS from `wait4`."""
    out = Path(tempfile.mkstemp(prefix=f"bench-{side}-", suffix=".json")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--out", str(out)]
    for key in ("data", "teacher", "student", "keep", "batch", "new_tokens", "steps", "warmup", "threads", "seed",
                "device"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.trl_grad_ckpt:
        cmd.append("--trl-grad-ckpt")
    env = offline_env(args.threads, **({"MINILLM_CPU_TUNING": "0"} if side == "gkd-untuned" else {}))
    usage = run_measured(f"side {side}", cmd, env, out.with_suffix(".log"))
    record = json.loads(out.read_text())
    record["rss_process_kb"] = usage["rss_mib"] * 1024
    return record


def step_flops(side: str, teacher: dict[str, int], student: dict[str, int], prompt: int, gen: int) -> float:
    """Model FLOPs of one step: 2·params per token forward, 6·params per token forward+backward, the
    output head counted only where logits are built (generated positions), attention scores ignored.

        gkd / trl:  rollout 2·S·(P+G) + 2·H_s·G   teacher 2·T·(P+G) + 2·H_t·G   train 6·S·(P+G) + 6·H_s·G
        minillm:    the same plus the teacher inside the mixed rollout, 2·T·(P+G) + 2·H_t·G

    with S, T the body params of student and teacher, H the head (hidden × vocab), P the real prompt
    tokens and G the generated tokens of the step.
    """
    tokens = prompt + gen
    s_fwd = 2 * student["body"] * tokens + 2 * student["head"] * gen
    t_fwd = 2 * teacher["body"] * tokens + 2 * teacher["head"] * gen
    flops = s_fwd + t_fwd + 3 * s_fwd
    if side.startswith("minillm"):
        flops += t_fwd
    return float(flops)


def summarize(records: list[dict[str, Any]], warmup: int, matmul: float) -> dict[str, Any]:
    """Median step time, throughput, memory, phase profile and MFU of one side (all its repeats)."""
    times, toks, flops, phase_rows = [], [], [], []
    for r in records:
        ends = r["step_ends"]
        for i in range(max(warmup, 1), len(ends)):
            dt = ends[i] - ends[i - 1]
            times.append(dt)
            toks.append(r["gen_tokens"][i])
            flops.append(step_flops(r["side"], r["teacher_shape"], r["student_shape"], r["prompt_tokens"][i],
                                    r["gen_tokens"][i]))
            phase_rows.append(dict(r["phases"][i], _step=dt))
    step = statistics.median(times)
    # Teacher-mixed sides: teacher forwards per generated token and the drafts' acceptance rate,
    # over all sampled batches (warm-up included: a property of the sampler, not of the timing).
    sampler = {k: sum(r["sampler"][k] for r in records) for k in records[0].get("sampler", {})}
    names = sorted({k for row in phase_rows for k in row if k != "_step"})
    profile = {k: statistics.median(row.get(k, 0.0) for row in phase_rows) for k in names}
    profile["other"] = statistics.median(row["_step"] - sum(v for k, v in row.items() if k != "_step")
                                         for row in phase_rows)
    return {
        "step_s": step,
        "tok_per_s": sum(toks) / sum(times),
        "s_per_token": sum(times) / sum(toks),
        "gen_tokens_per_step": statistics.median(toks),
        "rss_train_mib": max(r["rss_train_kb"] for r in records) / 1024,
        "rss_process_mib": max(r["rss_process_kb"] for r in records) / 1024,
        "profile": profile,
        "mfu": (sum(flops) / sum(times)) / matmul,
        "gflop_per_step": statistics.median(flops) / 1e9,
        "steps_measured": len(times),
        **({"teacher_calls_per_token": sampler["teacher_row_calls"] / max(sampler["tokens"], 1),
            "draft_accept": sampler["drafts_accepted"] / sampler["drafts_checked"] if sampler["drafts_checked"] else None,
            "speculative_tokens": records[0]["speculative_tokens"]} if sampler else {}),
    }


def report(summary: dict[str, dict[str, Any]], matmul: float, args: argparse.Namespace) -> str:
    """The printed (and markdown-ready) result table."""
    lines = [f"fp32 matmul rate ({args.threads} threads, 2048^3): {matmul / 1e9:.1f} GFLOP/s", "",
             "| side | s/step (median) | gen tok/s | gen tok/step | peak RSS train (MiB) | peak RSS process (MiB) "
             "| GFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for side, s in summary.items():
        lines.append(f"| {label(side)} | {s['step_s']:.2f} | {s['tok_per_s']:.1f} | {s['gen_tokens_per_step']:.0f} | "
                     f"{s['rss_train_mib']:.0f} | {s['rss_process_mib']:.0f} | {s['gflop_per_step']:.1f} | "
                     f"{100 * s['mfu']:.1f}% |")
    lines.append("")
    for peer in ("trl", "trl-tuned"):
        if "gkd" in summary and peer in summary:
            g, t = summary["gkd"], summary[peer]
            thr, rss = g["tok_per_s"] / t["tok_per_s"], g["rss_train_mib"] / t["rss_train_mib"]
            lines += [
                f"minillm gkd / {peer}: throughput x{thr:.2f} (target >= 2: {'met' if thr >= 2 else 'NOT met'}), "
                f"s/step x{g['step_s'] / t['step_s']:.2f}, peak RSS train x{rss:.2f} "
                f"(target <= 0.8: {'met' if rss <= 0.8 else 'NOT met'}), "
                f"peak RSS process x{g['rss_process_mib'] / t['rss_process_mib']:.2f}",
            ]
    if "gkd" in summary and "gkd-untuned" in summary:
        g, u = summary["gkd"], summary["gkd-untuned"]
        lines.append(f"minillm gkd, CPU process settings on / off: throughput x{g['tok_per_s'] / u['tok_per_s']:.2f}, "
                     f"peak RSS train x{g['rss_train_mib'] / u['rss_train_mib']:.2f}")
    mixed = [side for side in summary if side.startswith("minillm")]
    if mixed:
        lines += ["", "| minillm side | k | rollout s/step | gen tok/step | rollout s / gen token | teacher calls / gen token "
                  "| drafts accepted | time per gen token / gkd |", "|---|---|---|---|---|---|---|---|"]
        for side in mixed:
            m = summary[side]
            roll = m["profile"].get("rollout", 0.0)
            vs_gkd = f"x{m['s_per_token'] / summary['gkd']['s_per_token']:.2f}" if "gkd" in summary else "-"
            accept = f"{100 * m['draft_accept']:.1f}%" if m.get("draft_accept") is not None else "-"
            lines.append(f"| {side} | {m['speculative_tokens']} | {roll:.2f} | {m['gen_tokens_per_step']:.0f} | "
                         f"{1000 * roll / m['gen_tokens_per_step']:.1f} ms | {m['teacher_calls_per_token']:.3f} | "
                         f"{accept} | {vs_gkd} |")
        if "gkd" in summary and "minillm" in summary:
            m = summary["minillm"]
            ratio = m["s_per_token"] / summary["gkd"]["s_per_token"]
            lines += ["", f"minillm method (default k) / gkd: time per generated token x{ratio:.2f} "
                      f"(target <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'}); teacher calls per generated token "
                      f"{m['teacher_calls_per_token']:.3f} (target <= 0.35: "
                      f"{'met' if m['teacher_calls_per_token'] <= 0.35 else 'NOT met'})"]
    lines += ["", "Profile (median seconds per step; exclusive time of each phase):", ""]
    names = sorted({k for s in summary.values() for k in s["profile"]}, key=_phase_order)
    lines.append("| phase | " + " | ".join(summary) + " |")
    lines.append("|---|" + "---|" * len(summary))
    for name in names:
        cells = [f"{s['profile'].get(name, 0.0):.3f} ({100 * s['profile'].get(name, 0.0) / s['step_s']:.0f}%)"
                 for s in summary.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _phase_order(name: str) -> int:
    order = ["rollout", "teacher forward", "student forward", "loss (fwd)", "backward", "clip grad", "optimizer",
             "other"]
    return order.index(name) if name in order else len(order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, "instruction jsonl (prompts are its first rows)")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt")
    p.add_argument("--steps", type=int, default=6, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run the sides this many times, alternating the order")
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma-separated subset of {','.join(SIDES)}, "
                   "or minillm-k<N> (rollout.speculative_tokens=N)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs in bf16")
    p.add_argument("--trl-grad-ckpt", action="store_true", help="TRL with its default activation checkpointing")
    p.add_argument("--json", default=None, help="also write the raw records and the summary here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's time has no previous step end)")
    if args.child:
        child(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := [s for s in sides if s not in SIDES and speculative_side(s) is None]:
        p.error(f"--sides: unknown {unknown}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    matmul = spawn(args, "matmul")["matmul_flops_per_s"]
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            t0 = time.time()
            records[side].append(spawn(args, side))
            print(f"  repeat {rep + 1}: {side} done in {time.time() - t0:.0f}s", flush=True)
    # Measured before and after the sides; the higher figure is the machine's rate (the lower one
    # was disturbed by other load, which would flatter the MFU figures).
    matmul = max(matmul, spawn(args, "matmul")["matmul_flops_per_s"])
    summary = {s: summarize(records[s], args.warmup, matmul) for s in sides}
    print(report(summary, matmul, args), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "matmul_flops_per_s": matmul,
                                               "summary": summary, "records": records}, indent=1))


if __name__ == "__main__":
    main()
