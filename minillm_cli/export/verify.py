"""Verification: load the source in fp32, compute reference logits on a fixed prompt, reload the
export from its own files and compare.

Tolerances are absolute bounds on max |logit diff|; the relative ones are multiplied by the largest
|logit| of the source on the check prompt, because weight rounding errors scale with the logits
themselves (a model with logits of size 30 drifts 30x more than one of size 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError
from minillm_cli.export.options import TORCH_DTYPES, ExportOptions
from minillm_cli.runs import steps

if TYPE_CHECKING:
    import torch

SAME_DTYPE_ABS_TOL = 1e-6
"""Same weights, same dtype: the reload must reproduce the source bit for bit (slack for nothing)."""

LORA_MERGE_REL_TOL = 1e-4
"""Merging computes x(W + sBA) instead of xW + s(xA)B: same maths, different fp32 rounding (~1e-7
per op, summed over layers), far below what any wrong merge would give (order 1)."""

DTYPE_REL_TOL = {"fp16": 1e-2, "bf16": 5e-2}
"""Rounding every weight to fp16 (11-bit mantissa, ~5e-4 relative) or bf16 (8 bits, ~4e-3) perturbs
logits by a few times that after the layers add up; a broken file is off by order 1."""

GGUF_REL_TOL = {"f32": 1e-5, "f16": 1e-2, "q8_0": 5e-2}
"""f32: lossless but the metadata stores `rms_norm_eps` as float32 (1e-6 -> 9.99999997e-7).
f16 as fp16 above. q8_0 rounds each weight to 1/127 of its 32-block's max (~4e-3 relative)."""

CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. What is 12 plus 345? Answer: 357.\n"
"""The fixed text whose logits are compared (rendered with the chat template when there is one)."""


def load_source(step_dir: Path, is_lora: bool) -> tuple[Any, Any, str]:
    """The model to export in fp32 and eval mode, its tokenizer and the dtype its weights were saved in.

    A LoRA step is returned as a PeftModel on top of its base (meta.json `base_model`), unmerged,
    so that reference logits come from the adapter as trained; merging is left to the caller.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm_cli.runs.checkpoint import check_weights

    check_weights(step_dir)  # name a truncated or garbage file before transformers trips over it
    tokenizer = AutoTokenizer.from_pretrained(step_dir)
    if is_lora:
        base = _base_model_dir(step_dir)
        return _load_adapter(step_dir, base), tokenizer, _stored_dtype(base)
    if not (step_dir / "config.json").is_file():
        raise UserError(f"{step_dir}: no config.json; not a model step directory")
    model = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32)
    return model.eval(), tokenizer, _stored_dtype(step_dir)


def _base_model_dir(step_dir: Path) -> Path:
    """The local base model directory a LoRA step was trained on (`steps.lora_base`)."""
    base = steps.lora_base(step_dir)
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{step_dir / 'meta.json'}: base_model {base!r} is not a model directory; the LoRA adapter needs it")
    return Path(base)


def _load_adapter(adapter_dir: Path, base: Path) -> Any:
    """The base model with the LoRA adapter of `adapter_dir` on top, fp32, eval mode (not merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minillm_cli.runs.checkpoint import check_weights

    check_weights(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _stored_dtype(model_dir: Path) -> str:
    """`fp32` / `fp16` / `bf16`: the dtype the weights were saved in, from config.json (fp32 if unstated)."""
    config = steps.read_json(model_dir / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    by_torch_name = {v: k for k, v in TORCH_DTYPES.items()}
    return by_torch_name.get(name.removeprefix("torch."), "fp32")


def prompt_ids(tokenizer: Any) -> "torch.Tensor":
    """Token ids (1, T) of the check prompt, chat-templated when the tokenizer has a template."""
    text = CHECK_PROMPT
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": CHECK_PROMPT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def tolerance_for(opts: ExportOptions, source_dtype: str, target_dtype: str, merged: bool, reference: "torch.Tensor") -> float:
    """The max |logit diff| allowed for this export (see the tolerance constants above)."""
    scale = float(reference.abs().max())
    if opts.format == "gguf":
        rel = GGUF_REL_TOL[opts.gguf_type]
    elif target_dtype in (source_dtype, "fp32"):
        rel = 0.0  # no rounding of weights: an upcast or a plain copy
    else:
        rel = DTYPE_REL_TOL[target_dtype]
    if merged:
        rel += LORA_MERGE_REL_TOL
    return SAME_DTYPE_ABS_TOL + rel * scale


def verify(
    tmp: Path,
    opts: ExportOptions,
    step_dir: Path,
    ids: "torch.Tensor",
    reference: "torch.Tensor",
    tolerance: float,
) -> float:
    """Reload the export from `tmp` alone and return max |logit diff| against `reference`.

    Raises:
        UserError: the exported tokenizer tokenizes the prompt differently, or the diff exceeds
            `tolerance`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = next((p.name for p in tmp.glob("*.gguf")), None)
    if gguf_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file, dtype=torch.float32)
    elif (tmp / "adapter_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = _load_adapter(tmp, _base_model_dir(step_dir))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    model.eval()
    export_ids = prompt_ids(tokenizer)
    if not torch.equal(export_ids, ids):
        raise UserError(
            f"export of {step_dir}: the exported tokenizer splits the check prompt differently from the source; "
            f"nothing written to {opts.out}"
        )
    with torch.no_grad():
        logits = model(input_ids=export_ids).logits.float()  # (1, T, V)
    if logits.shape != reference.shape:
        got, want = tuple(logits.shape), tuple(reference.shape)
        raise UserError(f"export of {step_dir}: reloaded logits have shape {got}, expected {want}; nothing written to {opts.out}")
    diff = float((logits - reference).abs().max())
    if not diff <= tolerance:  # also catches nan
        raise UserError(
            f"export of {step_dir}: reloaded model differs from the source "
            f"(max |logit diff| {diff:.3g} > tolerance {tolerance:.3g}); nothing written to {opts.out}"
        )
    return diff
