"""A causal LM with its own KV cache, fed a batch of tokens per step: the decoding engine of
`minillm_cli.rollout`.

`CachedLM.step` runs one forward over the new tokens (the whole left-padded prompt at prefill, one
token per sequence after that) and returns fp32 next-token log-probs. Prompts of very different
lengths are prefilled in groups (`PREFILL_GROUP_TOKENS`), and for plain-head architectures the
output head is applied to the last hidden state only.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor


@functools.cache
def _cache_kwarg() -> str:
    """Name of the KV-cache argument of model forwards: `cache` in newer transformers 5 releases,
    `past_key_values` before (passing the old name there only adds deprecation warnings)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The KV cache returned by a forward, whichever attribute name this transformers version uses."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _input_device(model: Any) -> torch.device:  # an HF causal LM, maybe DDP-wrapped
    """Device of the input embeddings (the first device of a model split with a device map);
    a DDP wrapper is looked through."""
    return getattr(model, "module", model).get_input_embeddings().weight.device


PREFILL_GROUP_TOKENS = 512
"""Padded prompt tokens per group of the grouped prefill (see `CachedLM._grouped_prefill`)."""

_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose logits are exactly `lm_head(last hidden state)` (no bias, scale or soft-capping)."""


def _backbone_and_head(model: Any) -> tuple[torch.nn.Module, Tensor] | None:  # an HF causal LM
    """(decoder stack, output head weight) of a plain-head causal LM, else None (then the full model runs)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "model", None)
    if (getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES or type(head) is not torch.nn.Linear
            or head.bias is not None or not isinstance(decoder, torch.nn.Module)
            or getattr(decoder, "get_output_embeddings", lambda: None)() is not None):  # e.g. a PEFT wrapper
        return None
    return decoder, head.weight


class CachedLM:
    """A model plus its own KV cache; `step` returns fp32 log-probs of the next token.

    `spare_columns`: after the prefill the cache's layers append in place (`kv_cache.GrowingLayer`)
    with room for this many more columns before a buffer has to grow (0 = transformers' own layers).
    """

    def __init__(self, model: torch.nn.Module, out_device: torch.device, spare_columns: int = 0) -> None:
        self.model = model
        self.device = _input_device(model)
        self.out_device = out_device
        self.cache: Any = None
        self.split = _backbone_and_head(model)
        self.spare_columns = spare_columns

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Feed (B, L) new tokens (L = P at prefill, 1 when decoding) with the (B, past + L) mask;
        return (B, V) next-token log-probs."""
        logits = None
        prefill = self.cache is None
        if prefill and self.split is not None:
            logits = self._grouped_prefill(input_ids, attention_mask, position_ids)
        if logits is None:
            logits, self.cache = self._forward(input_ids, attention_mask, position_ids, self.cache)
        if prefill and self.spare_columns > 0:
            from minillm_cli.sampling.kv_cache import grow_in_place

            grow_in_place(self.cache, self.spare_columns)
        return logits.to(self.out_device).float().log_softmax(-1)  # (B, V)

    def can_drop_rows(self) -> bool:
        """Whether `keep_rows` works on the current cache (call after the prefill): a per-layer cache
        whose every layer can select batch rows (transformers' dynamic caches), or a plain tensor."""
        if isinstance(self.cache, Tensor):
            return True
        layers = getattr(self.cache, "layers", None) or []
        return (callable(getattr(self.cache, "batch_select_indices", None)) and len(layers) > 0
                and all(callable(getattr(layer, "batch_select_indices", None)) for layer in layers))

    def keep_rows(self, index: Tensor) -> None:
        """Keep only the batch rows `index` ((A,) long) of the KV cache, in that order: the decoding
        loops drop finished rows so that later forwards do not compute them."""
        if isinstance(self.cache, Tensor):
            self.cache = self.cache[index.to(self.cache.device)]
        else:
            self.cache.batch_select_indices(index.to(self.device))

    def step_all(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Feed (B, L) new tokens after the cached ones; return (B, L, V) next-token log-probs after
        EVERY new column (the speculative sampler's verification pass). The mask may hold zeros
        anywhere in the past (columns of rejected drafts): those keys are then never attended."""
        logits, self.cache = self._forward(input_ids, attention_mask, position_ids, self.cache,
                                           keep=input_ids.shape[1])
        return logits.to(self.out_device).float().log_softmax(-1)  # (B, L, V)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                 cache: Any, keep: int | None = None) -> tuple[Tensor, Any]:
        """Logits after the last column, (B, V) (or after the last `keep` columns, (B, keep, V)), and
        the KV cache extended by the (B, L) new tokens."""
        kwargs = {_cache_kwarg(): cache} if cache is not None else {}
        inputs = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                      position_ids=position_ids.to(self.device), use_cache=True, **kwargs)
        if self.split is None:
            out = self.model(**inputs, logits_to_keep=keep or 1)  # never build (B, P, V) logits at prefill
            return (out.logits[:, -1] if keep is None else out.logits[:, -keep:]), _output_cache(out)
        decoder, weight = self.split
        out = decoder(**inputs)
        if keep is not None:
            hidden = out.last_hidden_state[:, -keep:]  # (B, keep, H)
            return hidden.to(weight.dtype) @ weight.T, _output_cache(out)  # (B, keep, V)
        # The same logits as the model's head, computed as W @ h^T: with a handful of rows this
        # orientation of the (V, H) matmul runs about twice as fast on CPU as h @ W^T.
        hidden = out.last_hidden_state[:, -1]  # (B, H)
        return (weight @ hidden.to(weight.dtype).T).T, _output_cache(out)

    def _grouped_prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor | None:
        """Prefill left-padded prompts in groups of similar length, each without the padding it does
        not need, and join the groups' KV caches (zeros in the padded slots, which the attention mask
        hides). Prompts of very different lengths otherwise spend much of the prefill on padding.
        Returns the (B, V) logits, or None (nothing done) when grouping gains nothing or the model's
        cache is not a plain per-layer key/value cache."""
        from transformers.cache_utils import DynamicLayer

        B, P = input_ids.shape
        lengths = attention_mask.sum(-1).clamp_min(1).tolist()  # (B,) real prompt tokens
        groups: list[list[int]] = []
        for i in sorted(range(B), key=lambda i: -lengths[i]):
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= PREFILL_GROUP_TOKENS:
                groups[-1].append(i)  # rows are sorted: the group's first row is its longest
            else:
                groups.append([i])
        if len(groups) == 1 or sum(len(g) * lengths[g[0]] for g in groups) > 0.9 * B * P:
            return None
        logits, joined = None, None
        parts = []
        for rows in groups:
            index, n = torch.tensor(rows, device=input_ids.device), lengths[rows[0]]
            part, cache = self._forward(input_ids[index, -n:], attention_mask[index, -n:], position_ids[index, -n:],
                                        None)  # (b, V)
            layers = getattr(cache, "layers", None)
            if not layers or any(type(layer) is not DynamicLayer for layer in layers):
                return None
            if logits is None:
                logits = part.new_empty(B, part.shape[-1])  # (B, V)
            logits[index] = part
            parts.append((index, n, layers))
            joined = cache if joined is None else joined  # the first group's cache object holds the result
        for j, layer in enumerate(parts[0][2]):
            keys = layer.keys.new_zeros(B, layer.keys.shape[1], P, layer.keys.shape[3])  # (B, kv heads, P, d)
            values = layer.values.new_zeros(B, layer.values.shape[1], P, layer.values.shape[3])
            for index, n, layers in parts:
                keys[index, :, P - n :] = layers[j].keys
                values[index, :, P - n :] = layers[j].values
            layer.keys, layer.values = keys, values
        self.cache = joined
        return logits
