"""What the loop needs to know about a multi-process launch (accelerate: DDP, FSDP, DeepSpeed).

Collectives that every rank calls at the same point (`any_rank`, `reduce_metrics`, `agree_on_setup`,
`gather_full_weights`), what kind of launch this is (`is_deepspeed`, `is_fsdp`, `is_sharded`), and which
recipe / launch combinations are refused before any work (`check_launch`). Single-process runs pass
through every helper without communication. FSDP is FSDP2 applied by minillm (`fsdp.py` says why).
"""

from __future__ import annotations

from typing import Any

import torch

from minillm_cli.config.schema import Recipe
from minillm_cli.errors import UserError
from minillm_cli.parallel import fsdp
from minillm_cli.parallel.launch_config import check_combination


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
    """Refuse recipe / launch combinations the loop cannot run correctly (before any work).

    The rules are `launch_config.check_combination`'s, which the launching `minillm` applies to the
    config file before any process starts; here they see what accelerate made of the launch (for
    `accelerate launch` run by hand), plus the device checks only a started process can make."""
    sharded_fsdp = is_fsdp(accelerator)  # raises on an fsdp_config minillm does not implement (fsdp_version 1...)
    deepspeed = is_deepspeed(accelerator)
    plugin = accelerator.state.deepspeed_plugin if deepspeed else None
    check_combination(recipe, world=accelerator.num_processes, fsdp=sharded_fsdp, deepspeed=deepspeed,
                      zero3=plugin is not None and plugin.zero_stage == 3, resume=resume,
                      ds_gradient_clipping=plugin.deepspeed_config.get("gradient_clipping") if plugin else None)
    placement = recipe.models.teacher_placement
    if placement.startswith("device:"):
        if accelerator.device.type == "cpu":
            raise UserError(f"models.teacher_placement: {placement} needs accelerators; this run is on the CPU")
        count = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
        if int(placement[7:]) >= count:
            raise UserError(f"models.teacher_placement: {placement} does not exist ({count} devices)")


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
