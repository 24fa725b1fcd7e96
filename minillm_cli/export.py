"""Export one checkpoint of a run as a Hugging Face directory or a GGUF file, verified by reloading it.

`export(run_or_step_dir, opts)` picks a step dir (`pick_step`), loads the student in fp32 (merging a
LoRA adapter into its base unless told not to), computes reference logits on a fixed prompt, writes
the export into a temporary directory next to `opts.out`, reloads it from those files alone and
compares logits again. Only a complete, verified export is renamed to `opts.out`; anything else
leaves no trace there.

Formats:
- `safetensors`: `save_pretrained` (sharded above `shard_size`, with `model.safetensors.index.json`),
  tokenizer, generation config, the run's recipe and a model card `README.md` with the provenance.
- `gguf`: one `model-<type>.gguf` in llama.cpp's layout (llama architecture, byte-level BPE
  tokenizer), loadable by llama.cpp and by `transformers` with `gguf_file=`.

Layout of run and step dirs: docs/LAYOUT.md. Torch, transformers, peft and gguf are imported lazily
so that the CLI can import this module cheaply.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli import __version__
from minillm_cli.checkpoint import STEP_PREFIX, latest_step_dir, list_steps, step_name
from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

# ------------------------------------------------------------------------------- tolerances
# Verification compares the reloaded export with the source on the same token ids, in fp32.
# Tolerances are absolute bounds on max |logit diff|; the relative ones are multiplied by the
# largest |logit| of the source on the check prompt, because weight rounding errors scale with
# the logits themselves (a model with logits of size 30 drifts 30x more than one of size 1).

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

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_GGUF_TYPES = ("f32", "f16", "q8_0")
_LOWER_IS_BETTER = ("loss", "kl", "ece", "ppl", "perplexity")
_Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values; other rows fall back to f16


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


# ------------------------------------------------------------------------------ step choice
def pick_step(run_or_step_dir: Path, step: str) -> Path:
    """The step dir to export.

    Args:
        run_or_step_dir: A run dir, or a step dir (one with `meta.json`), which is used as is.
        step: `latest`, `best:<metric>` (lower is better for loss/kl/ece/ppl metrics, else higher)
            or a step number.

    Returns:
        A complete step directory.

    Raises:
        UserError: missing dir, no complete step, unknown step number or metric.
    """
    path = Path(run_or_step_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or step directory")
    if (path / "meta.json").is_file():
        return path
    steps = list_steps(path)
    if not steps:
        raise UserError(f"{path}: no complete step directory (no {STEP_PREFIX}* with meta.json); nothing to export")
    if step == "latest":
        return latest_step_dir(path) or steps[-1]
    if step.startswith("best:"):
        return _best_step(path, steps, step[len("best:") :])
    if step.isdigit():
        candidate = path / step_name(int(step))
        if candidate in steps:
            return candidate
        have = ", ".join(str(int(p.name[len(STEP_PREFIX) :])) for p in steps)
        raise UserError(f"--step {step}: {path} has no complete step {step} (have: {have})")
    raise UserError(f"--step: must be latest, best:<metric> or a step number, got {step!r}")


def _lower_is_better(metric: str) -> bool:
    """Loss-like metrics (loss, kl, ece, perplexity) improve downwards, the rest (rouge, acc) upwards."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(word in leaf for word in _LOWER_IS_BETTER)


def _best_step(run_dir: Path, steps: list[Path], metric: str) -> Path:
    """The complete step with the best value of `metric` in metrics.jsonl (or the steps' meta.json)."""
    if not metric:
        raise UserError("--step best:<metric>: name a metric, e.g. best:dev/rougeL")
    by_step = {int(p.name[len(STEP_PREFIX) :]): p for p in steps}
    values: dict[int, float] = {}
    seen_keys: set[str] = set()
    for row in _read_metrics(run_dir):
        seen_keys.update(k for k in row if k.startswith("dev/"))
        step, value = row.get("step"), row.get(metric)
        if step in by_step and isinstance(value, (int, float)) and math.isfinite(value):
            values[step] = float(value)  # a later line for the same step wins
    for step, path in by_step.items():
        if step not in values:
            dev = _read_json(path / "meta.json").get("dev_metrics") or {}
            seen_keys.update(dev)
            value = dev.get(metric, dev.get(metric.removeprefix("dev/")))
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[step] = float(value)
    if not values:
        known = ", ".join(sorted(seen_keys)) or "none"
        raise UserError(f"--step best:{metric}: no saved step of {run_dir} has a value for {metric} (dev metrics seen: {known})")
    sign = 1.0 if _lower_is_better(metric) else -1.0
    # ties go to the later step (trained longer for the same score)
    best = min(values, key=lambda s: (sign * values[s], -s))
    return by_step[best]


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON objects of run_dir/metrics.jsonl (unreadable lines, e.g. a torn last one, skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------- export
def export(run_or_step_dir: Path, opts: ExportOptions) -> ExportResult:
    """Export a step of a run to `opts.out`, verified, never clobbering anything by surprise.

    Args:
        run_or_step_dir: A run dir (the step is chosen by `opts.step`) or a step dir.
        opts: Format, dtype, sharding, LoRA handling, output dir and verification.

    Returns:
        The export's location, files and the measured logit difference.

    Raises:
        UserError: bad options, an existing non-empty `out` without `overwrite`, an unsupported
            model for GGUF, a missing LoRA base, or a verification that failed (nothing is left at
            `out` then).
    """
    import torch

    _check_options(opts)
    step_dir = pick_step(Path(run_or_step_dir), opts.step)
    out = Path(opts.out)
    _check_out(out, step_dir, opts.overwrite)
    meta = _read_json(step_dir / "meta.json")
    is_lora = bool(meta.get("lora")) or (step_dir / "adapter_config.json").is_file()
    if is_lora and not opts.merge_lora and (opts.format != "safetensors" or opts.dtype is not None):
        raise UserError("--no-merge keeps the LoRA adapter as trained: it cannot be combined with --format gguf or --dtype")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source, tokenizer, source_dtype = _load_source(step_dir, meta, is_lora)
        ids = _prompt_ids(tokenizer)
        with torch.no_grad():
            reference = source(input_ids=ids).logits.float()  # (1, T, V)
        if is_lora and opts.merge_lora:
            source = source.merge_and_unload()  # reference came from the unmerged adapter
        target_dtype = opts.dtype or source_dtype
        if opts.format == "gguf":
            _write_gguf(source, tokenizer, tmp / f"model-{opts.gguf_type}.gguf", opts.gguf_type)
        elif is_lora and not opts.merge_lora:
            _write_adapter(step_dir, tokenizer, tmp)
        else:
            _write_hf(source, tokenizer, step_dir, tmp, target_dtype, opts.shard_size)
        del source  # free the source weights before loading the export
        tolerance = _tolerance(opts, source_dtype, target_dtype, merged=is_lora and opts.merge_lora, reference=reference)
        (tmp / "README.md").write_text(
            _model_card(step_dir, meta, opts, target_dtype, is_lora=is_lora, files=_list_files(tmp)), encoding="utf-8"
        )
        diff = float("nan")
        if opts.verify:
            diff = _verify(tmp, opts, meta, step_dir, ids, reference, tolerance)
        files = _list_files(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        out=out,
        step_dir=step_dir,
        files=files,
        max_abs_logit_diff=diff,
        tolerance=tolerance if opts.verify else float("nan"),
    )


def _check_options(opts: ExportOptions) -> None:
    """Reject bad option values before any work, naming the flag."""
    from transformers.utils.hub import convert_file_size_to_int

    if opts.format not in ("safetensors", "gguf"):
        raise UserError(f"--format: must be safetensors or gguf, got {opts.format!r}")
    if opts.dtype is not None and opts.dtype not in _TORCH_DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(_TORCH_DTYPES)}, got {opts.dtype!r}")
    if opts.gguf_type not in _GGUF_TYPES:
        raise UserError(f"--gguf-type: must be one of {', '.join(_GGUF_TYPES)}, got {opts.gguf_type!r}")
    if opts.format == "gguf" and opts.dtype is not None:
        raise UserError("--dtype applies to safetensors exports; for GGUF choose --gguf-type f32, f16 or q8_0")
    try:
        if convert_file_size_to_int(opts.shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--shard-size: expected an integer and a unit like 500MB or 2GB, got {opts.shard_size!r}") from None


def _check_out(out: Path, step_dir: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber data: a file, a non-empty dir (without overwrite), the source."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    source = step_dir.resolve()
    target = out.resolve()
    if target == source or target in source.parents:
        raise UserError(f"--out {out}: contains the step being exported ({step_dir}); choose another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
        if not _is_export(out):
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
            shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
            raise UserError(f"--overwrite: {out} is not an earlier minillm export (it holds {shown}); refusing to "
                            "delete it: choose another --out")
        if Path.cwd().resolve() == target or target in Path.cwd().resolve().parents:
            raise UserError(f"--overwrite: refusing to delete {out}: it contains the current directory")


def _is_export(path: Path) -> bool:
    """An export written by minillm: its model card says so (see `_model_card`)."""
    try:
        return _CARD_SIGNATURE in (path / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _load_source(step_dir: Path, meta: dict[str, Any], is_lora: bool) -> tuple[Any, Any, str]:
    """The model to export in fp32 and eval mode, its tokenizer and the dtype its weights were saved in.

    A LoRA step is returned as a PeftModel on top of its base (`meta.json` `base_model`), unmerged,
    so that reference logits come from the adapter as trained; merging is left to the caller.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm_cli.checkpoint import check_weights

    check_weights(step_dir)  # name a truncated or garbage file before transformers trips over it
    tokenizer = AutoTokenizer.from_pretrained(step_dir)
    if is_lora:
        base = _base_model_dir(step_dir, meta)
        return _load_adapter(step_dir, base), tokenizer, _stored_dtype(base)
    if not (step_dir / "config.json").is_file():
        raise UserError(f"{step_dir}: no config.json; not a model step directory")
    model = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32)
    return model.eval(), tokenizer, _stored_dtype(step_dir)


def _base_model_dir(step_dir: Path, meta: dict[str, Any]) -> Path:
    """The local base model directory a LoRA step was trained on (meta.json `base_model`)."""
    base = meta.get("base_model")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{step_dir / 'meta.json'}: base_model {base!r} is not a model directory; the LoRA adapter needs it")
    return Path(base)


def _load_adapter(adapter_dir: Path, base: Path) -> Any:
    """The base model with the LoRA adapter of `adapter_dir` on top, fp32, eval mode (not merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minillm_cli.checkpoint import check_weights

    check_weights(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _stored_dtype(model_dir: Path) -> str:
    """`fp32` / `fp16` / `bf16`: the dtype the weights were saved in, from config.json (fp32 if unstated)."""
    config = _read_json(model_dir / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    by_torch_name = {v: k for k, v in _TORCH_DTYPES.items()}
    return by_torch_name.get(name.removeprefix("torch."), "fp32")


def _prompt_ids(tokenizer: Any) -> "torch.Tensor":
    """Token ids (1, T) of the check prompt, chat-templated when the tokenizer has a template."""
    text = CHECK_PROMPT
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": CHECK_PROMPT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _tolerance(opts: ExportOptions, source_dtype: str, target_dtype: str, merged: bool, reference: "torch.Tensor") -> float:
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


# ---------------------------------------------------------------------------------- writers
def _write_hf(model: Any, tokenizer: Any, step_dir: Path, tmp: Path, dtype: str, shard_size: str) -> None:
    """A Hugging Face directory: (sharded) safetensors in `dtype`, config, generation config, tokenizer, recipe."""
    import torch

    model.to(getattr(torch, _TORCH_DTYPES[dtype]))
    # transformers 5 always writes safetensors (pickle is gone), sharded with an index above max_shard_size
    model.save_pretrained(tmp, max_shard_size=shard_size)
    tokenizer.save_pretrained(tmp)
    if (step_dir / "generation_config.json").is_file():  # the trained one (a LoRA merge starts from the base's)
        shutil.copyfile(step_dir / "generation_config.json", tmp / "generation_config.json")
    if (step_dir / "recipe.yaml").is_file():
        shutil.copyfile(step_dir / "recipe.yaml", tmp / "recipe.yaml")


def _write_adapter(step_dir: Path, tokenizer: Any, tmp: Path) -> None:
    """The LoRA adapter as trained (adapter files, tokenizer, recipe); the card names its base."""
    for name in ("adapter_model.safetensors", "adapter_config.json", "generation_config.json", "recipe.yaml"):
        if (step_dir / name).is_file():
            shutil.copyfile(step_dir / name, tmp / name)
    if not (tmp / "adapter_model.safetensors").is_file():
        raise UserError(f"{step_dir}: LoRA step without adapter_model.safetensors")
    tokenizer.save_pretrained(tmp)


def _permute_qk(w: "np.ndarray", n_heads: int) -> "np.ndarray":
    """llama.cpp's row order for q/k projections (transformers' GGUF loader applies the inverse).

    HF rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs. Per head,
    rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...].
    Shapes: w (n_heads * head_dim, hidden) -> same, rows reordered.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF name inside `model.layers.N.` -> llama.cpp name inside `blk.N.`
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a LlamaForCausalLM parameter (None for ones it does not store)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module path>.weight
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        gguf = _GGUF_LAYER_NAMES.get(".".join(parts[3:-1]))
        if gguf is not None:
            return f"blk.{parts[2]}.{gguf}.weight"
    return None


def _write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str) -> None:
    """One GGUF file in llama.cpp's llama layout: hyper-parameters, tokenizer and weights.

    2-D weights are stored as `gguf_type` (q8_0 falls back to f16 for rows not a multiple of 32
    long); 1-D norms stay f32, as llama.cpp does.
    """
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "llama":
        raise UserError(
            f"GGUF export supports llama-architecture students only; this one is {cfg.model_type!r} (use --format safetensors)"
        )
    # transformers 5 keeps rope settings in `rope_parameters`, 4.x in `rope_scaling` + `rope_theta`
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"GGUF export: rope scaling {rope_type!r} of this student is not supported (use --format safetensors)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError("GGUF export: llama students with attention/MLP biases are not supported (use --format safetensors)")
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(path.stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[gguf_type])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_gguf_tokenizer(writer, tokenizer, cfg.vocab_size)

    for hf_name, tensor in model.state_dict().items():
        name = _gguf_tensor_name(hf_name)
        if name is None:
            raise UserError(f"GGUF export: parameter {hf_name} has no llama.cpp tensor name")
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        w = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            w = _permute_qk(w, n_heads)
        elif name.endswith("attn_k.weight"):
            w = _permute_qk(w, n_kv)
        if w.ndim == 1 or gguf_type == "f32":
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        elif gguf_type == "q8_0" and w.shape[-1] % _Q8_BLOCK == 0:
            q = gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType.Q8_0)  # (rows, bytes) uint8
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_gguf_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """`tokenizer.ggml.*` metadata for a byte-level BPE tokenizer (llama.cpp's "gpt2" model).

    Token strings stay in the byte-level alphabet (`Ġthe`), as llama.cpp's converter writes them;
    ids past the tokenizer's vocabulary (embedding padding) become unused `[PADi]` tokens.
    """
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("decoder")):
        decoder = (state.get("decoder") or {}).get("type")
        raise UserError(f"GGUF export supports byte-level BPE tokenizers only; this one is {model.get('type')!r} with decoder {decoder!r}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"GGUF export: tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre_tokenizer(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    for kind, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]  # does the tokenizer prepend BOS on its own?
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a HF byte-level pre-tokenizer.

    Plain GPT-2 splitting is "gpt-2"; SmolLM's single-digit split + GPT-2 is "smollm"; a regex split
    is named after the llama.cpp pre-tokenizer with the same regex (transformers' table of them).
    """
    pre = pre or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        try:  # the regexes transformers' GGUF reader knows by llama.cpp name (transformers >= 5)
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex:
                return name
    raise UserError(f"GGUF export: cannot name this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pre)[:120]})")


# ----------------------------------------------------------------------------- verification
def _verify(
    tmp: Path,
    opts: ExportOptions,
    meta: dict[str, Any],
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
        model = _load_adapter(tmp, _base_model_dir(step_dir, meta))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    model.eval()
    export_ids = _prompt_ids(tokenizer)
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


# ------------------------------------------------------------------------------- model card
def _dev_metrics(step_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Dev metrics of this step: meta.json's, else the last dev eval in metrics.jsonl up to this step."""
    if meta.get("dev_metrics"):
        return dict(meta["dev_metrics"])
    step = meta.get("step")
    found: dict[str, Any] = {}
    for row in _read_metrics(step_dir.parent):
        dev = {k: v for k, v in row.items() if k.startswith("dev/")}
        if dev and (step is None or not isinstance(row.get("step"), int) or row["step"] <= step):
            found = dev
    return found


def _read_recipe(step_dir: Path) -> dict[str, Any]:
    """The resolved recipe saved with the step (or the run), as a dict; {} if absent or unreadable."""
    import yaml

    for path in (step_dir / "recipe.yaml", step_dir.parent / "recipe.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def _fmt(value: Any) -> str:
    if value is None or value == "" or value == {}:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


_CARD_SIGNATURE = "A student distilled with minillm"


def _model_card(step_dir: Path, meta: dict[str, Any], opts: ExportOptions, dtype: str, is_lora: bool, files: list[str]) -> str:
    """README.md: where the model came from (teacher, init, method settings, data hash, steps, dev
    metrics, tool version) and how it was exported."""
    import yaml

    recipe = _read_recipe(step_dir)
    method = recipe.get("method") if isinstance(recipe.get("method"), dict) else {"name": meta.get("method")}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    recipe_data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    method_name = meta.get("method") or method.get("name") or "unknown"
    if opts.format == "gguf":
        fmt = f"gguf ({opts.gguf_type})"
    elif is_lora and not opts.merge_lora:
        fmt = "LoRA adapter (safetensors, not merged)"
    else:
        fmt = f"safetensors ({dtype})" + (", LoRA merged into the base" if is_lora else "")
    rows = [
        ("Teacher", meta.get("teacher")),
        ("Student", meta.get("student")),
        ("Student init", meta.get("student_init")),
        ("Method", method_name),
        ("Data", data.get("path") or recipe_data.get("path")),
        ("Data sha256", data.get("sha256")),
        ("Steps", meta.get("step")),
        ("LoRA base model", meta.get("base_model") if is_lora else None),
        ("Source checkpoint", str(step_dir)),
        ("Export format", fmt),
        ("minillm version", f"{__version__} (trained with {meta.get('minillm_version', '?')})"),
    ]
    dev = _dev_metrics(step_dir, meta)
    tags = list(dict.fromkeys(["minillm", "distillation", str(method_name)]))  # no duplicate for method minillm
    front = {"library_name": "peft" if is_lora and not opts.merge_lora else "transformers", "tags": tags}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {opts.out.name}", ""]
    lines += [f"{_CARD_SIGNATURE} ({method_name}) from {_fmt(meta.get('teacher'))}.", ""]
    lines += ["## Provenance", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    lines += ["", "## Method settings", "", "```yaml", yaml.safe_dump({"method": method}, sort_keys=False).strip(), "```", ""]
    lines += ["## Final dev metrics", ""]
    if dev:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(dev.items())]
    else:
        lines += ["No dev evaluation was recorded for this step."]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    gguf_file = next((f for f in files if f.endswith(".gguf")), None)
    if gguf_file:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{opts.out.name}", gguf_file="{gguf_file}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}", gguf_file="{gguf_file}")']
    elif is_lora and not opts.merge_lora:
        lines += ["from peft import PeftModel", ""]
        lines += [f'base = AutoModelForCausalLM.from_pretrained("{meta.get("base_model")}")']
        lines += [f'model = PeftModel.from_pretrained(base, "{opts.out.name}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}")']
    else:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{opts.out.name}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}")']
    lines += ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- publishing
def _list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out` (same filesystem, so each rename is atomic).

    An existing `out` (empty, or non-empty with --overwrite, checked earlier) is first renamed aside
    and deleted only once the new one is in place, so a crash never leaves neither.
    """
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    old = out.parent / f".{out.name}.old-export-{os.getpid()}"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists():
            os.rename(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
