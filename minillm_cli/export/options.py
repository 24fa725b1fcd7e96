"""What `minillm export` is asked to do (`ExportOptions`), what it did (`ExportResult`), and the
check of the option values before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minillm_cli.errors import UserError

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass
class ExportOptions:
    """What to export and how (mirrors the `minillm export` flags)."""

    out: Path
    format: str = "safetensors"
    """`safetensors` (HF directory) or `gguf` (one .gguf file plus a model card)."""
    dtype: str | None = None
    """None keeps the trained dtype; `fp32`, `fp16` or `bf16` converts (safetensors only)."""
    shard_size: str = "2GB"
    """Max safetensors shard size, transformers style (`500MB`, `2GB`, `1GiB`)."""
    merge_lora: bool = True
    """Merge a LoRA adapter into its base; False copies the adapter as is, next to a note of the base."""
    gguf_type: str = "f16"
    """GGUF tensor type of 2-D weights: `f32`, `f16` or `q8_0` (norms always stay f32)."""
    step: str = "latest"
    """`latest`, `best:<metric>` (e.g. `best:dev/rougeL`) or a step number."""
    overwrite: bool = False
    """Replace an existing non-empty `out`."""
    verify: bool = True
    """Reload the export and compare its logits with the source before publishing it."""


@dataclass
class ExportResult:
    """Where the export went and how close it came to the source."""

    out: Path
    step_dir: Path
    files: list[str]
    """Relative paths of the files written under `out`, sorted."""
    max_abs_logit_diff: float
    """max |logits(export) - logits(source)| on the check prompt (nan when not verified)."""
    tolerance: float
    """The bound that difference had to stay within (nan when not verified)."""


def check_options(opts: ExportOptions) -> None:
    """Reject bad option values before any work, naming the flag."""
    from transformers.utils.hub import convert_file_size_to_int

    if opts.format not in ("safetensors", "gguf"):
        raise UserError(f"--format: must be safetensors or gguf, got {opts.format!r}")
    if opts.dtype is not None and opts.dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(TORCH_DTYPES)}, got {opts.dtype!r}")
    if opts.gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type: must be one of {', '.join(GGUF_TYPES)}, got {opts.gguf_type!r}")
    if opts.format == "gguf" and opts.dtype is not None:
        raise UserError("--dtype applies to safetensors exports; for GGUF choose --gguf-type f32, f16 or q8_0")
    try:
        if convert_file_size_to_int(opts.shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--shard-size: expected an integer and a unit like 500MB or 2GB, got {opts.shard_size!r}") from None
