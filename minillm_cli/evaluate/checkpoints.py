"""The models `minillm eval` compares: each argument resolved to local files (a run dir to its latest
step, a LoRA step to its base, via `rundir`) and loaded; one student in memory at a time."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError
from minillm_cli.models import loading as models_mod
from minillm_cli.runs import checkpoint, steps

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSpec:
    """A model to evaluate, resolved to local files."""

    name: str
    """Display name: what the user typed (the teacher's gets a ' (teacher)' suffix)."""
    path: Path
    """A model directory, or the LoRA adapter (step) directory when `base` is set."""
    base: Path | None = None
    """The base model directory of a LoRA adapter."""


def resolve_checkpoint(arg: str, name: str | None = None, say: Callable[[str], None] | None = None) -> ModelSpec:
    """Resolve a run dir (its `latest` step), step dir, model dir, .gguf, alias or hub id.

    Raises:
        UserError: A run dir without complete checkpoint, a path that is not a model, a LoRA step
            whose base model is missing.
    """
    path = steps.model_step(Path(arg).expanduser(), arg)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return ModelSpec(name=name or arg, path=path, base=_lora_base(path, say))
    target = str(path) if path.is_dir() else arg  # a run dir resolved to its step dir
    return ModelSpec(name=name or arg, path=models_mod.resolve_model(target, say=say))


def _lora_base(step_dir: Path, say: Callable[[str], None] | None) -> Path:
    """The base model of a LoRA step (`steps.lora_base`), resolved like any model argument."""
    base = steps.lora_base(step_dir)
    if not base:
        raise UserError(f"{step_dir}: LoRA adapter without a base model (no base_model in meta.json)")
    try:
        return models_mod.resolve_model(base, say=say)
    except UserError as e:
        raise UserError(f"{step_dir}: LoRA base model {base!r}: {e}") from None


def load_checkpoint(spec: ModelSpec, device: "torch.device", dtype: "torch.dtype") -> tuple["torch.nn.Module", Any]:
    """Load a resolved model and its tokenizer; a LoRA adapter is applied with peft and merged."""
    if spec.base is None:
        return models_mod.load_model(spec.path, dtype=dtype, device=device), models_mod.load_tokenizer(spec.path)
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{spec.path}: a LoRA checkpoint needs peft (pip install 'minillm[lora]')") from None
    base = models_mod.load_model(spec.base, dtype=dtype, device=device)
    checkpoint.check_weights(spec.path)  # the adapter's own file
    model = PeftModel.from_pretrained(base, str(spec.path)).merge_and_unload().eval()
    has_tokenizer = (spec.path / "tokenizer_config.json").is_file()
    return model, models_mod.load_tokenizer(spec.path if has_tokenizer else spec.base)


def output_width(model: Any) -> int:  # an HF causal LM
    return int(model.get_output_embeddings().weight.shape[0])


def free(model: "torch.nn.Module | None") -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
