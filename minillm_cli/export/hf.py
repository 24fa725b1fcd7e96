"""Hugging Face directory export: (sharded) safetensors weights, or a LoRA adapter copied as trained."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError
from minillm_cli.export.options import TORCH_DTYPES


def write_hf(model: Any, tokenizer: Any, step_dir: Path, tmp: Path, dtype: str, shard_size: str) -> None:
    """A Hugging Face directory: (sharded) safetensors in `dtype`, config, generation config, tokenizer, recipe."""
    import torch

    model.to(getattr(torch, TORCH_DTYPES[dtype]))
    # transformers 5 always writes safetensors (pickle is gone), sharded with an index above max_shard_size
    model.save_pretrained(tmp, max_shard_size=shard_size)
    tokenizer.save_pretrained(tmp)
    if (step_dir / "generation_config.json").is_file():  # the trained one (a LoRA merge starts from the base's)
        shutil.copyfile(step_dir / "generation_config.json", tmp / "generation_config.json")
    if (step_dir / "recipe.yaml").is_file():
        shutil.copyfile(step_dir / "recipe.yaml", tmp / "recipe.yaml")


def write_adapter(step_dir: Path, tokenizer: Any, tmp: Path) -> None:
    """The LoRA adapter as trained (adapter files, tokenizer, recipe); the card names its base."""
    for name in ("adapter_model.safetensors", "adapter_config.json", "generation_config.json", "recipe.yaml"):
        if (step_dir / name).is_file():
            shutil.copyfile(step_dir / name, tmp / name)
    if not (tmp / "adapter_model.safetensors").is_file():
        raise UserError(f"{step_dir}: LoRA step without adapter_model.safetensors")
    tokenizer.save_pretrained(tmp)
