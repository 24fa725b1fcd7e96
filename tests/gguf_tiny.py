"""Write a tiny Hugging Face llama directory as an f32 GGUF file, the way llama.cpp's converter does.

Only what transformers' GGUF loader reads back is written: the `llama.*` hyper-parameters, a
byte-level BPE ("gpt2") tokenizer as `tokenizer.ggml.*` arrays, and the tensors under GGUF names
(`token_embd`, `blk.N.attn_q`, ...), with q/k rows permuted as llama.cpp does (the loader undoes it).
Used by tests/test_models.py to test GGUF conversion without a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.tiny import CHAT_TEMPLATE

# HF parameter name (layer part after `model.layers.N.`) -> GGUF tensor name (after `blk.N.`)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation: within each head, interleave the two rotary halves.

    Shapes: w (n_head * head_dim, hidden) -> same shape, rows reordered.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: str | Path, gguf_path: str | Path, arch: str = "llama") -> Path:
    """Write the HF llama in `model_dir` (safetensors + tokenizer.json) as an f32 GGUF at `gguf_path`.

    Args:
        model_dir: A directory written by `tests/tiny.make_llama`.
        gguf_path: The `.gguf` file to write.
        arch: The `general.architecture` to claim (tests pass an unknown one to check the error).

    Returns:
        `gguf_path` as a Path.
    """
    import gguf
    from safetensors.numpy import load_file

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))

    # Tokens ordered by id; added (special) tokens are already in the BPE vocab for tiny.make_tokenizer.
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {added["content"] for added in tok["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(gguf_path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([_TOKEN_CONTROL if t in specials else _TOKEN_NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(CHAT_TEMPLATE)

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:  # absent = tied embeddings, which the loader infers
        w.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in _LAYER_NAMES.items():
            t = weights[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute_rows(t, heads)
            elif gg == "attn_k":
                t = _permute_rows(t, kv_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_path
