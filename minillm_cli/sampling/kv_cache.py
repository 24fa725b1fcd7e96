"""A KV-cache layer that appends in place: the decoding loops' cache after the prefill.

transformers' `DynamicLayer` appends the new keys/values of every forward with `torch.cat`, a copy
of the layer's whole cache: per decode step, every cached token of every layer is copied once (in
the benchmark's teacher-mixed rollouts, 6% of the rollout time). `GrowingLayer` keeps the keys and
values in buffers with spare columns, writes new tokens into them and hands out views of the
filled columns; a full buffer doubles (amortised O(1) copies per token).

Imports transformers at module level: `cached_lm` imports this module only when a cache exists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys` / `values` (B, heads, n, d) are views of (B, heads, capacity, d) buffers."""

    def __init__(self, keys: Tensor, values: Tensor, spare: int) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.n = keys.shape[-2]
        self._k = self._buffer(keys, self.n + spare)
        self._v = self._buffer(values, self.n + spare)
        self._views()

    @staticmethod
    def _buffer(filled: Tensor, capacity: int) -> Tensor:
        B, H, n, d = filled.shape
        buf = filled.new_empty(B, H, capacity, d)
        buf[:, :, :n] = filled
        return buf

    def _views(self) -> tuple[Tensor, Tensor]:
        keys, values = self._k[:, :, : self.n], self._v[:, :, : self.n]  # (B, heads, n, d)
        self.keys, self.values = keys, values
        return keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append (B, heads, L, d) new keys/values; return the views of all n + L columns."""
        L = key_states.shape[-2]
        if self.n + L > self._k.shape[-2]:
            capacity = max(2 * self._k.shape[-2], self.n + L)
            self._k = self._buffer(self._k[:, :, : self.n], capacity)
            self._v = self._buffer(self._v[:, :, : self.n], capacity)
        self._k[:, :, self.n : self.n + L] = key_states
        self._v[:, :, self.n : self.n + L] = value_states
        self.n += L
        return self._views()

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows `indices` (the decoding loops drop finished rows)."""
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self._k.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` columns (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of columns to remove, got {tokens_to_remove}")
        self.n = max(self.n + tokens_to_remove, 0)
        self._views()

    def reset(self) -> None:
        self.n = 0
        self._views()


def grow_in_place(cache: Any, spare: int) -> bool:
    """Turn every plain `DynamicLayer` of a transformers cache into a `GrowingLayer` with `spare`
    free columns; False (nothing changed) unless the cache is a list of plain dynamic layers."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    for i, layer in enumerate(layers):
        layers[i] = GrowingLayer(layer.keys, layer.values, spare)
    return True
