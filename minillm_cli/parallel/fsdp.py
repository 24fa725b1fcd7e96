"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied by minillm itself, on CPUs and GPUs alike.

Why not accelerate's FSDP plugin: accelerate (1.x) turns an FSDP launch into `DistributedType.FSDP`
only on accelerator backends (CUDA, XPU, NPU, ...); on CPU processes over gloo the launch stays
`MULTI_CPU`, the plugin is dropped and `accelerator.prepare` would wrap the model in DDP. So the one
code path that the CPU test-suite can run is this one: `accelerate launch --config_file fsdp.yaml`
still starts the processes and sets the `FSDP_*` variables from the config's `fsdp_config`, and
minillm reads them here and shards the models with `fully_shard` on every device type (the model is
never given to `accelerator.prepare`).

What sharding does to the loop, and where it is handled:
- parameters become DTensors sharded along dim 0 (each rank holds a contiguous slice);
- every forward all-gathers a block's weights and every backward reduce-scatters its gradients, so
  all ranks must run the same number of forward/backward passes (`batching.even_passes`);
- checkpoints hold full weights (`full_state_dict`), the optimizer state is saved per rank as the
  local slices (`local_optimizer_state`, `reshard_optimizer_state`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from minillm_cli.errors import UserError
from minillm_cli.parallel.launch_config import fsdp_problem


@dataclass(frozen=True)
class FsdpSettings:
    """The parts of an accelerate config's `fsdp_config` minillm honours (from the launcher's env)."""

    version: int
    reshard_after_forward: bool
    activation_checkpointing: bool


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def fsdp_settings() -> FsdpSettings | None:
    """The FSDP launch's settings, None when this is not an FSDP launch.

    Raises:
        UserError: a setting minillm does not implement (one line naming the config key).
    """
    if _env_flag("ACCELERATE_USE_FSDP", "false") != "true":
        return None
    # accelerate launch exports each fsdp_config key as FSDP_<KEY>; the rules are launch_config's
    keys = ("version", "auto_wrap_policy", "offload_params", "cpu_ram_efficient_loading", "state_dict_type")
    problem = fsdp_problem({k: os.environ[f"FSDP_{k.upper()}"] for k in keys if f"FSDP_{k.upper()}" in os.environ})
    if problem is not None:
        raise UserError(f"accelerate config: {problem}")
    version = int(os.environ.get("FSDP_VERSION", "1"))
    reshard = _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true") in ("true", "1", "full_shard")
    return FsdpSettings(version=version, reshard_after_forward=reshard,
                        activation_checkpointing=_env_flag("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true")


def _mixed_precision(accelerator: Any) -> Any:
    """bf16 / fp16 compute (`mixed_precision` of the accelerate config) with fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if dtype is None:
        return MixedPrecisionPolicy()  # compute in the parameters' own dtype (models.dtype)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: torch.nn.Module, accelerator: Any, settings: FsdpSettings, *, train: bool) -> torch.nn.Module:
    """Shard `model` in place over all processes: each decoder block is one FSDP unit (its weights are
    gathered for its forward and freed after it), the rest (embeddings, final norm, head) the root unit.

    `train`: the student (activation checkpointing when the config asks); the frozen teacher never
    keeps activations, so it gets none. Returns the same module (its class becomes an FSDP subclass).
    """
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise UserError(f"models: cannot find the decoder blocks of {type(model).__name__} to shard "
                        "(it declares no _no_split_modules)")
    if train and settings.activation_checkpointing:
        # Recompute each block in backward: autograd keeps only block inputs, (B, L, h) per block.
        enable: Any = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise UserError(f"accelerate config: fsdp_activation_checkpointing: {type(model).__name__} does not "
                            "support it; set it to false")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = _mixed_precision(accelerator)
    if train and mp.param_dtype is not None:
        # fp32 master shards (AdamW moments fp32 too), computed in param_dtype: what `minillm plan`
        # counts (P·4/W); checkpoints then hold fp32 weights.
        model.to(torch.float32)
    kw = {"reshard_after_forward": settings.reshard_after_forward, "mp_policy": mp}
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a sharded one: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on the CPU of rank 0 (empty elsewhere), names as in the unsharded model (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Global gradient norm of sharded parameters, clipping to `max_norm` when set (collective)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(full_tensor(norm))


def local_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded moment replaced by this rank's slice (savable)."""
    return {**state, "state": {pid: {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                               for pid, s in state["state"].items()}}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of local slices: make each moment a DTensor laid out like its parameter.

    `Optimizer.load_state_dict` casts a saved tensor to its parameter's dtype and device but keeps it a
    plain tensor; AdamW's update needs moments of the parameter's kind (exp_avg: (rows/W, cols) here).
    """
    from torch.distributed.tensor import DTensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                shape=param.shape, stride=param.stride())
