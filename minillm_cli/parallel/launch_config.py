"""What a multi-process launch is, and which recipe / launch combinations minillm refuses: one set of
rules, applied twice.

- Before any process starts, by the launching `minillm distill|sft` (`read_accelerate_config`,
  `check_processes`, `check_combination` from the config file and `--num-processes`), so that bad
  input ends as one line and exit code 2 without seconds of model loading per process.
- Inside every process, from what accelerate made of the launch (`distributed.check_launch` calls
  `check_combination` and `fsdp_problem` with the accelerator's view), for `accelerate launch` run
  by hand.

No torch import at module level: the CLI uses this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError

if TYPE_CHECKING:
    from minillm_cli.config.schema import Recipe

DATA_PARALLEL = frozenset({"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                           "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"})
"""accelerate distributed types that mean plain data parallelism (DDP) to minillm."""
SUPPORTED = DATA_PARALLEL | {"FSDP", "DEEPSPEED"}


@dataclass(frozen=True)
class AccelerateConfig:
    """The parts of an accelerate config file that decide how minillm trains."""

    path: Path
    distributed_type: str
    num_processes: int | None
    fsdp: dict[str, Any]
    """`fsdp_config` with the `fsdp_` prefix dropped (version, auto_wrap_policy, ...)."""
    zero_stage: int | None
    gradient_clipping: float | None


def read_accelerate_config(path: Path) -> AccelerateConfig:
    """Read and check an accelerate config file (a launch minillm can run), before any process starts.

    Raises:
        UserError: unreadable, not YAML, not a mapping, an unknown or unsupported `distributed_type`,
            an FSDP setting minillm does not implement, malformed numbers — one line naming the key.
    """
    from minillm_cli.config.loading import load_yaml

    flag = f"--accelerate-config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: unreadable ({e.__class__.__name__}: not a UTF-8 text file?)") from None
    try:
        cfg = load_yaml(text, flag)
    except Exception as e:  # yaml.YAMLError and its kin: the file is not YAML
        raise UserError(f"{flag}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict) or not cfg:
        raise UserError(f"{flag}: not an accelerate config (expected a mapping with distributed_type, got "
                        f"{type(cfg).__name__ if cfg is not None else 'an empty file'})")
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind not in SUPPORTED:
        known = "XLA, MEGATRON_LM" if kind in ("XLA", "MEGATRON_LM") else ""
        what = f"not supported by minillm ({known} launches are not)" if known else "unknown"
        raise UserError(f"{flag}: distributed_type {cfg.get('distributed_type')!r} is {what}; use one of "
                        "MULTI_GPU / MULTI_CPU (data parallel), FSDP or DEEPSPEED")
    num = cfg.get("num_processes")
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise UserError(f"{flag}: num_processes must be a whole number >= 1, got {num!r}")
    fsdp_cfg = cfg.get("fsdp_config") or {}
    ds_cfg = cfg.get("deepspeed_config") or {}
    for key, section in (("fsdp_config", fsdp_cfg), ("deepspeed_config", ds_cfg)):
        if not isinstance(section, dict):
            raise UserError(f"{flag}: {key} must be a mapping, got {type(section).__name__}")
    fsdp = {str(k).removeprefix("fsdp_"): v for k, v in fsdp_cfg.items()}
    if kind == "FSDP":
        problem = fsdp_problem(fsdp)
        if problem is not None:
            raise UserError(f"{flag}: {problem}")
    stage, clip = ds_cfg.get("zero_stage"), ds_cfg.get("gradient_clipping")
    if kind == "DEEPSPEED":
        if stage not in (0, 1, 2, 3, None):
            raise UserError(f"{flag}: deepspeed_config.zero_stage must be 0, 1, 2 or 3, got {stage!r}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
            raise UserError(f"{flag}: deepspeed_config.gradient_clipping must be a number, got {clip!r}")
    return AccelerateConfig(path=path, distributed_type=kind, num_processes=num, fsdp=fsdp,
                            zero_stage=stage if kind == "DEEPSPEED" else None,
                            gradient_clipping=float(clip) if kind == "DEEPSPEED" and clip is not None else None)


def _on(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def fsdp_problem(settings: Mapping[str, Any]) -> str | None:
    """What minillm's FSDP2 (`fsdp.py`) does not implement in these `fsdp_config` settings (keys
    without the `fsdp_` prefix, values as in the file or in the launcher's FSDP_* variables), or None."""
    version = str(settings.get("version", 1)).strip()
    if version != "2":
        return f"fsdp_version {version} is not supported; use fsdp_version 2 (the shipped --accelerate-config fsdp)"
    policy = str(settings.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP"))
    if policy != "TRANSFORMER_BASED_WRAP":
        return f"fsdp_auto_wrap_policy {policy} is not supported; use TRANSFORMER_BASED_WRAP (decoder blocks are the shard unit)"
    if _on(settings.get("offload_params", False)):
        return "fsdp_offload_params true is not supported; use false"
    if _on(settings.get("cpu_ram_efficient_loading", False)):
        return ("fsdp_cpu_ram_efficient_loading true is not supported; use false (every process loads the weights, "
                "then they are sharded)")
    state_dict = str(settings.get("state_dict_type", "FULL_STATE_DICT"))
    if state_dict != "FULL_STATE_DICT":
        return (f"fsdp_state_dict_type {state_dict} is not supported; minillm checkpoints always hold full weights "
                "(FULL_STATE_DICT)")
    return None


def check_processes(num_processes: int, gpus: int, cpus: int) -> None:
    """Refuse more processes than the machine has devices for (one per GPU; without GPUs, one per core).

    Raises:
        UserError: naming --num-processes and what the machine has.
    """
    if gpus > 0 and num_processes > gpus:
        raise UserError(f"--num-processes: {num_processes} processes but {gpus} GPU(s) are visible; one process per "
                        f"GPU, at most {gpus}")
    if gpus == 0 and num_processes > cpus:
        raise UserError(f"--num-processes: {num_processes} CPU processes on a machine with {cpus} CPU core(s) and no "
                        f"GPU would each get a fraction of a core; use at most {cpus}")


def check_combination(recipe: Recipe, *, world: int, fsdp: bool, deepspeed: bool, zero3: bool, resume: bool,
                      ds_gradient_clipping: float | None = None) -> None:
    """Refuse recipe / launch combinations the loop cannot run correctly.

    Args:
        world: number of processes.
        fsdp: an FSDP launch of 2 or more processes (minillm shards with FSDP2).
        deepspeed, zero3: a DeepSpeed launch, and whether it partitions the weights (stage 3).
        ds_gradient_clipping: the DeepSpeed config's gradient_clipping (DeepSpeed launches).

    Raises:
        UserError: one line naming the recipe key or flag and what to use instead.
    """
    m, name = recipe.models, recipe.method.name
    teacher_samples = name == "seqkd" or (name == "minillm" and getattr(recipe.method, "teacher_mix", 0) > 0)
    placement = m.teacher_placement
    if placement == "sharded":
        if not fsdp:
            raise UserError("models.teacher_placement: sharded needs an FSDP launch of 2 or more processes "
                            "(--accelerate-config fsdp --num-processes N)")
        if teacher_samples:
            raise UserError(f"models.teacher_placement: a sharded teacher cannot sample ({name} samples from the "
                            "teacher, and ranks decode for different lengths); use shared or cpu")
    if placement.startswith("device:") and world > 1:
        raise UserError(f"models.teacher_placement: {placement} is for single-process runs ({world} processes here)")
    launch = "FSDP" if fsdp else "DeepSpeed" if deepspeed else None
    if fsdp or zero3:
        if name == "gkd":
            raise UserError(f"method.name: gkd samples from the student at every micro-batch, not supported under {launch}")
        if m.lora.enabled:
            raise UserError(f"models.lora: LoRA is not supported under {launch}; use --accelerate-config ddp")
    if deepspeed:
        if resume:
            raise UserError("--resume: DeepSpeed runs keep the optimizer in DeepSpeed's own format and cannot resume yet")
        if (recipe.optim.grad_clip or 0.0) != float(ds_gradient_clipping or 0.0):
            raise UserError(f"optim.grad_clip: {recipe.optim.grad_clip} differs from the DeepSpeed config's "
                            f"gradient_clipping {ds_gradient_clipping} (DeepSpeed clips inside its step); make them equal")


def visible_devices() -> tuple[int, int]:
    """(GPUs, CPU cores) this process may use."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return gpus, cpus
