"""GGUF export: one file in llama.cpp's llama layout (hyper-parameters, byte-level BPE tokenizer,
weights), loadable by llama.cpp and by `transformers` with `gguf_file=`. The `gguf` package and numpy
are imported lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np

_Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values; other rows fall back to f16


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


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str) -> None:
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
