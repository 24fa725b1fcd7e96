"""Memory plan: what one training process holds on its device, estimated from model configs alone.

`minillm plan RECIPE` and `minillm distill --dry-run` read the teacher's and student's config.json
(hidden size, layers, intermediate size, vocabulary, heads: `minillm_cli.model_shapes`) — never their
weights — and add up, per device, for a launch of `num_processes` processes with a given sharding:

    weights    teacher P_t·b (shared) | P_t·4/W (sharded by FSDP: fp32 shards) | 0 (cpu, device:N)
               student P_s·b (none)   | P_s·4/W (fsdp)   | P_s·b/W (zero3)     + 2 gathered layers (sharded)
    gradients  P_tr·b (none; + P_tr·b of DDP buckets when W > 1) | P_tr·4/W (fsdp, zero3)
    AdamW      2·P_tr·b (none: torch keeps the moments in the parameter dtype) | 2·P_tr·4/W + P_tr·4/W
               fp32 master weights (zero3) — fsdp's fp32 master weights are the student weights above
    activations  B·L·layers·(10h + k·i)·b, k = 4 (gated MLP), 5 (GPT-2), 1 (OPT): the tensors autograd
                 keeps per token and block (measured on transformers' blocks, fused attention, no
                 dropout); with activation checkpointing B·L·(layers·h + 10h + k·i)·b
    working    2·B·L·(10h + k·i)·b: one block's forward temporaries / backward activation gradients
    logits     B·T·V·b ×2 (student logits and their gradient) + B·T·V·b (teacher, where used)
    kd from a teacher cache (`data.teacher_cache`): no teacher weights and no teacher logits, but the
               cache read buffers of one micro-batch B·T·(K·(b_c + 4) + 4) (top-K log-probs in the
               cache's dtype b_c, int32 ids, fp32 tail; K and dtype from the cache's manifest, else
               K = 64 fp16); its shards are memory-mapped (host page cache, not counted). seqkd from
               cached answers: no teacher and no sampling KV caches
    rollouts   MiniLLM teacher-logit buffer (num_rollouts/W)·max_new_tokens·V·b, the small per-token
               buffers, KV caches of one rollout batch, and (sharded) a full student copy for sampling

with b the bytes of `models.dtype` (auto is planned as bf16, what an accelerator that supports it
gets), W processes, B = train.batch_size, L the longest sequence of a micro-batch, T its response
columns. Everything is summed as if alive at once: an upper bound of the peak, by design. Not
modelled: the CUDA context and allocator fragmentation (the fit test keeps 10% in reserve),
attention score matrices (fused attention kernels do not store them), host-side checkpoint copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from minillm_cli.config.methods import GkdMethod, MiniLlmMethod, SeqKdMethod
from minillm_cli.config.schema import Recipe
from minillm_cli.data.cache_format import DTYPE_BYTES, read_manifest
from minillm_cli.errors import UserError
from minillm_cli.models.shapes import Shape, model_shape, read_config, shape_from_config

GiB = 1024**3
SHARDINGS = ("none", "fsdp", "zero3")
RESERVE = 0.10
"""Fraction of device memory kept for the CUDA context, allocator fragmentation and temporaries."""

_DTYPE_BYTES = {"auto": 2, "bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------------- the shapes
def _student_shape(recipe: Recipe) -> Shape:
    m = recipe.models
    if m.student is not None:
        return model_shape(m.student)
    if m.student_init is None or m.teacher is None:
        raise UserError("models.student: the plan needs a student (models.student, or student_init with a teacher)")
    init, teacher_cfg = m.student_init, read_config(m.teacher)
    teacher = shape_from_config(teacher_cfg, m.teacher)
    if init.from_ == "teacher":
        layers = len(init.layers) if init.layers is not None else init.keep
        cfg = {**teacher.config, "num_hidden_layers": layers, "n_layer": layers}
    else:
        cfg = {**teacher.config, **init.config}
    return shape_from_config(cfg, f"student built from {m.teacher}")


# --------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Per-device memory of one training process, by component."""

    rows: list[tuple[str, float, str]]
    """(component, bytes, how it was counted)."""
    num_processes: int
    sharding: str
    activation_checkpointing: bool
    host_bytes: float = 0.0
    """CPU memory for a teacher placed on the CPU."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.rows)

    def part(self, component: str) -> float:
        return sum(b for name, b, _ in self.rows if name == component)


def _trainable(recipe: Recipe, s: Shape) -> int:
    m = recipe.models
    if m.lora.enabled:
        dims = {"q_proj": (s.hidden, s.hidden), "o_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, s.kv_dim),
                "v_proj": (s.hidden, s.kv_dim), "gate_proj": (s.hidden, s.intermediate),
                "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
        per_layer = sum(sum(dims.get(t, (s.hidden, s.hidden))) for t in m.lora.target_modules)
        return m.lora.r * per_layer * s.layers
    if m.trainable_layers is not None:
        return min(m.trainable_layers, s.layers) * s.layer_params() + s.hidden
    return s.params


def _sequence_lengths(recipe: Recipe) -> tuple[int, int]:
    """(L, T): the longest sequence of a training micro-batch and its response columns (upper bounds)."""
    d, method = recipe.data, recipe.method
    if method.name == "minillm":
        return d.max_prompt_tokens + method.max_new_tokens, method.max_new_tokens
    if method.name == "gkd":
        return max(d.max_total_tokens, d.max_prompt_tokens + method.max_new_tokens), max(
            d.max_total_tokens - 1, method.max_new_tokens)
    if method.name == "seqkd":
        return d.max_prompt_tokens + method.max_new_tokens, method.max_new_tokens
    return d.max_total_tokens, d.max_total_tokens - 1


def plan_memory(recipe: Recipe, *, num_processes: int = 1, sharding: str = "none",
                activation_checkpointing: bool | None = None) -> MemoryPlan:
    """Estimate the per-device memory of training `recipe` on `num_processes` processes.

    Args:
        sharding: none (one full copy per process, DDP), fsdp (`--accelerate-config fsdp`: fp32
            shards, bf16 compute) or zero3 (`--accelerate-config zero3`).
        activation_checkpointing: default on with fsdp (the shipped config enables it), off otherwise.

    Raises:
        UserError: an unknown sharding, fewer than one process, or a model whose config is unreadable.
    """
    if sharding not in SHARDINGS:
        raise UserError(f"--sharding: must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if num_processes < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num_processes}")
    ac = sharding == "fsdp" if activation_checkpointing is None else activation_checkpointing
    W, m, tr, name = num_processes, recipe.models, recipe.train, recipe.method.name
    b = _DTYPE_BYTES[m.dtype]
    s = _student_shape(recipe)
    cached = recipe.data.teacher_cache is not None  # kd from a teacher cache: no teacher in the process
    needs_teacher = name in ("kd", "seqkd", "gkd", "minillm") and not cached
    t = model_shape(m.teacher) if needs_teacher and m.teacher is not None else None
    P_tr = _trainable(recipe, s)
    plan = MemoryPlan(rows=[], num_processes=W, sharding=sharding, activation_checkpointing=ac)
    add = plan.rows.append

    # ---- weights
    if cached:
        add(("teacher weights", 0.0, f"not loaded: {name} reads data.teacher_cache"))
    if t is not None:
        placement = m.teacher_placement
        if placement == "sharded":
            add(("teacher weights", t.params * 4 / W + 2 * t.layer_params() * b,
                 f"{t.params / 1e9:.2f}B params, fp32 shards over {W} + 2 gathered blocks"))
        elif placement == "cpu":
            add(("teacher weights", 0.0, "on the CPU (see host memory)"))
            plan.host_bytes += t.params * b
        elif placement.startswith("device:"):
            add(("teacher weights", 0.0, f"on accelerator {placement[7:]}: {t.params * b / GiB:.1f} GiB there"))
        else:
            add(("teacher weights", t.params * b, f"{t.params / 1e9:.2f}B params × {b} B, one copy per process"))
    gathered = 2 * s.layer_params() * b  # the block being computed and the prefetched next one
    if sharding == "none":
        add(("student weights", s.params * b, f"{s.params / 1e9:.2f}B params × {b} B"))
        add(("gradients", P_tr * b, f"{P_tr / 1e9:.3f}B trainable × {b} B"))
        if W > 1:
            add(("DDP gradient buckets", P_tr * b, "DDP's all-reduce buffers (one more gradient copy)"))
        add(("optimizer (AdamW)", 2 * P_tr * b, f"2 moments in the parameter dtype ({b} B)"))
    elif sharding == "fsdp":
        add(("student weights", s.params * 4 / W + gathered, f"fp32 shards over {W} + 2 gathered blocks"))
        add(("gradients", P_tr * 4 / W, f"fp32 shards over {W}"))
        add(("optimizer (AdamW)", 2 * P_tr * 4 / W, f"2 fp32 moments, sharded over {W}"))
    else:
        add(("student weights", s.params * b / W + gathered, f"{b}-byte shards over {W} + 2 gathered blocks"))
        add(("gradients", P_tr * 4 / W, f"fp32 shards over {W}"))
        add(("optimizer (AdamW)", 3 * P_tr * 4 / W, f"fp32 master weights + 2 fp32 moments, sharded over {W}"))

    # ---- one micro-batch: activations and logits
    L, T = _sequence_lengths(recipe)
    B = tr.batch_size
    block = B * L * s.activation_elements() * b  # one block's saved activations for the micro-batch
    if ac:
        add(("activations", B * L * s.layers * s.hidden * b + block,
             f"checkpointed: block inputs + one block, B={B} × L={L}"))
    else:
        add(("activations", s.layers * block, f"B={B} × L={L} tokens × {s.layers} blocks"))
    add(("working memory", 2 * block, "one block's temporaries (forward) / activation gradients (backward)"))
    logit = B * (T + 1) * s.vocab * b
    xtok = m.cross_tokenizer and name == "minillm"  # the teacher scores text: no teacher logits at training time
    teacher_logits = name in ("kd", "gkd", "minillm") and not cached and not xtok
    add(("logits (B×T×V)", logit * (3 if teacher_logits else 2),
         f"B={B} × T={T + 1} × V={s.vocab}: student + its gradient" + (" + teacher" if teacher_logits else "")))
    if cached and name == "kd":
        k, dtype = _cache_shape(recipe, plan)
        add(("teacher cache buffers", B * T * (k * (DTYPE_BYTES[dtype] + 4) + 4),
             f"B={B} × T={T} × K={k}: top-k log-probs ({dtype}) + int32 ids + fp32 tail, per micro-batch"))

    # ---- rollouts
    method = recipe.method
    if isinstance(method, MiniLlmMethod):
        n = max(method.num_rollouts // W, 1)
        mx = method.max_new_tokens
        small = n * (mx * 7 * 4 + 2 * recipe.data.max_prompt_tokens * 8)
        if not xtok:  # the separate teacher pass keeps every position's logits
            add(("rollout buffer", n * mx * s.vocab * b + small,
                 f"teacher logits {n} rollouts × {mx} tokens × V={s.vocab} × {b} B + per-token buffers"))
        else:
            add(("rollout buffer", small, f"{n} rollouts × {mx} tokens: per-token buffers (no teacher logits)"))
        if xtok and t is not None:
            # One teacher forward per rollout batch over its own tokens of the text: assumed at most
            # twice the student's tokens; logits and their log-softmax in fp32 for those positions.
            rb, t_len = recipe.rollout.batch_size, 2 * mx
            add(("teacher re-tokenised batch", rb * (t_len + 1) * t.vocab * 4 * 2,
                 f"{rb} rows × {t_len + 1} teacher tokens (≤ 2× the student's) × V_t={t.vocab}, fp32 logits + "
                 "log-softmax"))
    if isinstance(method, (MiniLlmMethod, GkdMethod, SeqKdMethod)):
        rb = method.batch_size if isinstance(method, SeqKdMethod) else recipe.rollout.batch_size
        ctx_len = recipe.data.max_prompt_tokens + method.max_new_tokens
        models = []
        if name != "seqkd":
            models.append(s)
        if t is not None and (isinstance(method, SeqKdMethod) or (isinstance(method, MiniLlmMethod) and method.teacher_mix > 0)):
            models.append(t)
        kv = sum(rb * ctx_len * sh.layers * 2 * sh.kv_dim * b for sh in models)
        if models:  # seqkd from cached answers samples nothing
            add(("KV caches (sampling)", kv, f"{rb} sequences × {ctx_len} positions, {len(models)} model(s)"))
        if sharding != "none" and name == "minillm":
            add(("sampling copy of the student", s.params * b, "full student gathered once per buffer"))
    if sharding == "fsdp":
        # Not in the total (not alive with the training state): the student is loaded whole in every
        # process before `fsdp.shard` cuts it, and rank 0 gathers full weights (host memory) to save.
        plan.notes.append(f"fsdp: each process first loads the whole student ({s.params * b / GiB:.2f} GiB) and "
                          f"shards it; checkpoints gather full weights on rank 0's host ({s.params * 4 / GiB:.2f} GiB)")
    if sharding != "none" and name == "gkd":
        plan.notes.append("gkd is not supported with a sharded student (it samples at every micro-batch)")
    return plan


def _cache_shape(recipe: Recipe, plan: MemoryPlan) -> tuple[int, str]:
    """(K, storage dtype) of `data.teacher_cache` from its manifest; 64 / fp16 (the defaults) before it exists."""
    assert recipe.data.teacher_cache is not None
    root = Path(recipe.data.teacher_cache).expanduser()
    manifest = read_manifest(root) if root.is_dir() else None
    if manifest is None:
        plan.notes.append(f"data.teacher_cache: {root} is not built yet; planned with the defaults --top-k 64 --dtype fp16")
        return 64, "fp16"
    if manifest["identity"]["kind"] != "logprobs":
        plan.notes.append(f"data.teacher_cache: {root} holds answers, not log-probs (kd refuses it); planned with "
                          "the defaults --top-k 64 --dtype fp16")
        return 64, "fp16"
    return int(manifest["identity"]["top_k"]), str(manifest["identity"]["dtype"])


def sharding_of(accelerate_config: Path) -> str:
    """The plan's sharding for an accelerate config file: fsdp, zero3 or none.

    Raises:
        UserError: the file is not an accelerate config minillm can launch (`launch_config`).
    """
    from minillm_cli.parallel.launch_config import read_accelerate_config

    cfg = read_accelerate_config(Path(accelerate_config))
    if cfg.distributed_type == "FSDP":
        return "fsdp"
    if cfg.distributed_type == "DEEPSPEED" and cfg.zero_stage == 3:
        return "zero3"
    return "none"


# ------------------------------------------------------------------------------------- verdicts
def parse_size(text: str) -> float:
    """`80GB`, `80GiB`, `141 GB`, `24g` -> bytes (GB and GiB both mean 1024³ here: device specs do)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if match is None:
        raise UserError(f"--device-memory: {text!r} is not a size like 80GB")
    scale = {"": GiB, "k": 1024, "m": 1024**2, "g": GiB, "t": 1024**4}[match.group(2)]
    return float(match.group(1)) * scale


def fits(plan: MemoryPlan, device_memory: float) -> bool:
    """Whether the plan's total stays within the device memory minus the reserve."""
    return plan.total <= device_memory * (1 - RESERVE)


def suggestions(recipe: Recipe, plan: MemoryPlan, device_memory: float, limit: int = 3) -> list[str]:
    """Changes that make the run fit, least disruptive first (each with its new per-device total)."""
    W, sharding, ac = plan.num_processes, plan.sharding, plan.activation_checkpointing
    tr = recipe.train
    candidates: list[tuple[str, Recipe, int, str, bool]] = []
    bs, accum = tr.batch_size, tr.grad_accum
    while bs > 1:  # halve the micro-batch, double accumulation: the same global batch
        bs, accum = bs // 2, accum * 2
        r = recipe.model_copy(deep=True)
        r.train.batch_size, r.train.grad_accum = bs, accum
        candidates.append((f"train.batch_size={bs} train.grad_accum={accum}", r, W, sharding, ac))
    teacher_can_shard = recipe.method.name != "seqkd" and getattr(recipe.method, "teacher_mix", 0) == 0
    live_teacher = recipe.models.teacher is not None and recipe.data.teacher_cache is None
    if live_teacher and sharding == "fsdp" and teacher_can_shard:
        r = recipe.model_copy(deep=True)
        r.models.teacher_placement = "sharded"
        candidates.append(("models.teacher_placement=sharded", r, W, sharding, ac))
    for shard in ("fsdp", "zero3"):
        if shard != sharding and W > 1:
            candidates.append((f"--sharding {shard} ({W} processes)", recipe, W, shard, shard == "fsdp" or ac))
    for more in (2 * W, 4 * W, 8 * W):
        shard = sharding if sharding != "none" else "fsdp"
        candidates.append((f"--num-processes {more} --sharding {shard}", recipe, more, shard, shard == "fsdp" or ac))
    if live_teacher and recipe.models.teacher_placement != "cpu":
        r = recipe.model_copy(deep=True)
        r.models.teacher_placement = "cpu"  # last: a large teacher is slow on the CPU
        candidates.append(("models.teacher_placement=cpu (slow)", r, W, sharding, ac))
    out = []
    for text, r, n, shard, a in candidates:
        p = plan_memory(r, num_processes=n, sharding=shard, activation_checkpointing=a)
        if fits(p, device_memory):
            out.append(f"{text}: {p.total / GiB:.1f} GiB per device")
        if len(out) == limit:
            break
    return out


def print_plan(recipe: Recipe, console: Console, *, num_processes: int = 1, sharding: str = "none",
               device_memory: float | None = None, activation_checkpointing: bool | None = None) -> MemoryPlan:
    """Print the memory plan table, whether it fits `device_memory` and what would make it fit."""
    plan = plan_memory(recipe, num_processes=num_processes, sharding=sharding,
                       activation_checkpointing=activation_checkpointing)
    m = recipe.models
    title = (f"memory per device: {recipe.method.name}, {num_processes} process(es), sharding {sharding}, "
             f"dtype {'bf16 (auto)' if m.dtype == 'auto' else m.dtype}, "
             f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}")
    table = Table(title=title, show_header=True, expand=False)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("counted as")
    for name, size, how in plan.rows:
        table.add_row(name, f"{size / GiB:.2f}", how)
    table.add_row("[bold]total[/]", f"[bold]{plan.total / GiB:.2f}[/]", "all at once: an upper bound of the peak")
    console.print(table)
    if plan.host_bytes:
        console.print(f"host memory for the CPU teacher: {plan.host_bytes / GiB:.1f} GiB per process", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    if device_memory is not None:
        usable = device_memory * (1 - RESERVE)
        if fits(plan, device_memory):
            console.print(f"fits: {plan.total / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable "
                          f"({device_memory / GiB:.0f} GiB less {RESERVE:.0%} reserve)", highlight=False)
        else:
            console.print(f"does not fit: {plan.total / GiB:.1f} GiB > {usable / GiB:.1f} GiB usable "
                          f"({device_memory / GiB:.0f} GiB less {RESERVE:.0%} reserve)", highlight=False)
            tips = suggestions(recipe, plan, device_memory)
            for tip in tips:
                console.print(f"  try {tip}", highlight=False)
            if not tips:
                console.print("  nothing tried fits (smaller micro-batches, teacher placement, sharding, "
                              "up to 8× the processes)", highlight=False)
    return plan
