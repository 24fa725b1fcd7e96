"""The sizes of a decoder-only transformer that decide its memory, read from its config.json alone.

`model_shape(spec)` reads the config of a local model directory, of a well-known checkpoint
(`KNOWN_CONFIGS`, so that the paper recipes plan without a download) or of a hub id in the local
cache, and counts parameters and saved activations per token (LLaMA-, GPT-2- and OPT-style models).
Weights are never read: `minillm plan` must be cheap and work offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError

_LLAMA = {"model_type": "llama", "tie_word_embeddings": False}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # Offline numbers of well-known checkpoints (their config.json), so that the paper recipes plan
    # without a download. A local directory is read first, these names next, the hub cache last.
    "huggyllama/llama-7b": {**_LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                            "vocab_size": 32000, "num_attention_heads": 32},
    "huggyllama/llama-13b": {**_LLAMA, "hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824,
                             "vocab_size": 32000, "num_attention_heads": 40},
    "facebook/opt-1.3b": {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
                          "vocab_size": 50272, "num_attention_heads": 32, "max_position_embeddings": 2048},
    "facebook/opt-13b": {"model_type": "opt", "hidden_size": 5120, "num_hidden_layers": 40, "ffn_dim": 20480,
                         "vocab_size": 50272, "num_attention_heads": 40, "max_position_embeddings": 2048},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    "gpt2-xl": {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25, "vocab_size": 50257,
                "n_positions": 1024},
    "smollm2-135m-instruct": {**_LLAMA, "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                              "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3,
                              "tie_word_embeddings": True},
}
KNOWN_CONFIGS["llama-7b"] = KNOWN_CONFIGS["huggyllama/llama-7b"]
KNOWN_CONFIGS["llama-13b"] = KNOWN_CONFIGS["huggyllama/llama-13b"]
KNOWN_CONFIGS["openai-community/gpt2"] = KNOWN_CONFIGS["gpt2"]
KNOWN_CONFIGS["openai-community/gpt2-xl"] = KNOWN_CONFIGS["gpt2-xl"]

# Families whose MLP is two matrices with biases (fc1/fc2) and whose embeddings are tied by default.
_CLASSIC = ("gpt2", "opt", "gpt_neo", "gptj", "gpt_neox", "bloom", "falcon", "phi")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that decide its memory."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    gated_mlp: bool
    """gate/up/down projections (LLaMA family) instead of fc1/fc2."""
    tied: bool
    """Output head shares the input embedding."""
    positions: int = 0
    """Rows of a learned position embedding (GPT-2, OPT); 0 for rotary models."""
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        attn = 2 * h * h + 2 * h * kv  # q, o and k, v projections
        if self.gated_mlp:
            return attn + 3 * h * i + 2 * h  # + two RMSNorm weights
        return attn + 2 * h * i + (2 * h + 2 * kv + i + h) + 4 * h  # + biases, two LayerNorms

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        final_norm = self.hidden if self.gated_mlp else 2 * self.hidden  # RMSNorm weight / LayerNorm weight + bias
        return self.vocab * self.hidden + head + self.positions * self.hidden + self.layers * self.layer_params() + final_norm

    def activation_elements(self) -> int:
        """Elements autograd keeps per token and block: about 10h for the norms, projections and
        fused attention, k·i for the MLP (gate, up, activation, product: k = 4; GPT-2's tanh GELU:
        5; OPT's ReLU: 1). Measured with saved-tensor hooks on transformers' blocks (tests/test_plan.py)."""
        k = 4 if self.gated_mlp else {"gpt2": 5, "opt": 1}.get(self.config.get("model_type", ""), 4)
        return 10 * self.hidden + k * self.intermediate


def shape_from_config(cfg: dict[str, Any], name: str) -> Shape:
    """Read the sizes out of a Hugging Face config dict (LLaMA-, GPT-2- and OPT-style key names)."""
    cfg = {**cfg, **(cfg.get("text_config") or {})}

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is None:
            raise UserError(f"{name}: config.json has none of {', '.join(keys)}")
        return default

    model_type = str(cfg.get("model_type", ""))
    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head", "num_heads"))
    classic = model_type in _CLASSIC
    positions = 0
    if model_type == "gpt2":
        positions = int(first("n_positions", default=1024))
    elif model_type == "opt":
        positions = int(first("max_position_embeddings", default=2048)) + 2  # OPT offsets positions by 2
    return Shape(
        name=name,
        hidden=hidden,
        layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
        intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        vocab=int(first("vocab_size")),
        heads=heads,
        kv_heads=int(first("num_key_value_heads", default=heads)),
        gated_mlp=not classic,
        tied=bool(cfg.get("tie_word_embeddings", classic)),
        positions=positions,
        config=cfg,
    )


def read_config(spec: str) -> dict[str, Any]:
    """The config.json of a model given as a local directory, a known name, or a cached hub id.

    Raises:
        UserError: nothing readable offline (a .gguf file, an alias or a hub id not in the cache).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec}: not a model directory (no config.json)")
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    if spec in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[spec])
    if spec.count("/") == 1 and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
    raise UserError(f"{spec}: cannot read its config.json offline (not a local model directory, not in the "
                    f"Hugging Face cache, not one of the known models); pass a local model directory")


def model_shape(spec: str) -> Shape:
    """`shape_from_config(read_config(spec))`."""
    return shape_from_config(read_config(spec), spec)
