"""What the loop needs to know about a multi-process launch (accelerate: DDP, FSDP, DeepSpeed).

Collectives that every rank calls at the same point (`any_rank`, `reduce_metrics`, `agree_on_setup`,
`gather_full_weights`), what kind of launch this is (`is_deepspeed`, `is_fsdp`, `is_sharded`), and which
recipe / launch combinations are refused before any work (`check_launch`). Single-process runs pass
through every helper without communication. FSDP is FSDP2 applied by minillm (`fsdp.py` says why).
"""

from __future__ import annotations

from typing import Any

import torch

from minillm_cli import fsdp
from minillm_cli.config import Recipe
from minillm_cli.errors import UserError


def reduce_metrics(accelerator: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean of numeric metrics over ranks (logged once, by the main process)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if accelerator.num_processes > 1 and out:
        keys = sorted(out)
        t = torch.tensor([out[k] for k in keys], device=accelerator.device, dtype=torch.float64)
        t = accelerator.reduce(t, reduction="mean")
        out = dict(zip(keys, t.tolist()))
    return out


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a signal, say, reaches ranks at different times)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def agree_on_setup(accelerator: Any, error: Exception | None) -> None:
    """Raise on every rank if setup failed on any rank (the failing rank re-raises its own error).

    Collective: every rank calls it once, after its checks and before the main process writes.
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])  # one per rank
        failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
        if failed and error is None:
            rank, msg = failed[0]
            text = msg.split(": ", 1)[1] if msg.startswith("UserError: ") else msg
            raise UserError(f"rank {rank}: {text}")
    if error is not None:
        raise error


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Any) -> bool:
    """Whether this is an FSDP launch of several processes (minillm shards with FSDP2, `fsdp.shard`).

    An FSDP config launched as one process trains unsharded: there is nothing to shard over."""
    return accelerator.num_processes > 1 and fsdp.fsdp_settings() is not None


def is_sharded(accelerator: Any) -> bool:
    """Whether a prepared student holds only a shard of its weights in each process."""
    if is_fsdp(accelerator):
        return True
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def check_launch(recipe: Recipe, accelerator: Any, resume: bool) -> None:
    """Refuse recipe / launch combinations the loop cannot run correctly (before any work)."""
    m, name = recipe.models, recipe.method.name
    world = accelerator.num_processes
    sharded_fsdp = is_fsdp(accelerator)  # raises on an fsdp_config minillm does not implement (fsdp_version 1...)
    launch = "FSDP" if sharded_fsdp else "DeepSpeed" if is_deepspeed(accelerator) else None
    teacher_samples = name == "seqkd" or (name == "minillm" and getattr(recipe.method, "teacher_mix", 0) > 0)
    placement = m.teacher_placement
    if placement == "sharded":
        if not sharded_fsdp:
            raise UserError("models.teacher_placement: sharded needs an FSDP launch of 2 or more processes "
                            "(--accelerate-config fsdp --num-processes N)")
        if teacher_samples:
            raise UserError(f"models.teacher_placement: a sharded teacher cannot sample ({name} samples from the "
                            "teacher, and ranks decode for different lengths); use shared or cpu")
    if placement.startswith("device:"):
        if world > 1:
            raise UserError(f"models.teacher_placement: {placement} is for single-process runs ({world} processes here)")
        if accelerator.device.type == "cpu":
            raise UserError(f"models.teacher_placement: {placement} needs accelerators; this run is on the CPU")
        count = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
        if int(placement[7:]) >= count:
            raise UserError(f"models.teacher_placement: {placement} does not exist ({count} devices)")
    if launch is not None and is_sharded(accelerator):
        if name == "gkd":
            raise UserError(f"method.name: gkd samples from the student at every micro-batch, not supported under {launch}")
        if m.lora.enabled:
            raise UserError(f"models.lora: LoRA is not supported under {launch}; use --accelerate-config ddp")
    if launch == "DeepSpeed":
        clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        if resume:  # checked before the run directory is touched (run_setup calls this first)
            raise UserError("--resume: DeepSpeed runs keep the optimizer in DeepSpeed's own format and cannot resume yet")
        if (recipe.optim.grad_clip or 0.0) != float(clip or 0.0):
            raise UserError(f"optim.grad_clip: {recipe.optim.grad_clip} differs from the DeepSpeed config's "
                            f"gradient_clipping {clip} (DeepSpeed clips inside its step); make them equal")


def gather_full_weights(sharded: Any, replica: torch.nn.Module, deepspeed: bool) -> None:
    """Copy a sharded student's full weights into `replica` (collective: every rank calls it)."""
    target = dict(replica.named_parameters())
    if deepspeed:  # ZeRO-3: gather one tensor at a time (bounded extra memory)
        import deepspeed as ds

        for name, p in sharded.module.named_parameters():
            with ds.zero.GatheredParameters([p]):
                target[name].copy_(p.detach())
        return
    # FSDP2 keeps the module tree and its names; each DTensor is all-gathered on its own (one full
    # parameter of extra memory at a time), in the same order on every rank.
    for name, p in sharded.named_parameters():
        target[name].copy_(fsdp.full_tensor(p.detach()))
