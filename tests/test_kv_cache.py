"""`kv_cache.GrowingLayer` (in-place appends) against transformers' `DynamicLayer` (torch.cat appends)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from minillm_cli.sampling.kv_cache import GrowingLayer, grow_in_place


def _kv(B: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, L, 4, generator=g), torch.randn(B, 2, L, 4, generator=g)  # (B, heads, L, d)


@pytest.mark.parametrize("spare", [0, 3, 100])
def test_growing_layer_holds_what_a_dynamic_layer_holds(spare: int) -> None:
    ref = DynamicLayer()
    ref.update(*_kv(4, 6, 0))
    layer = GrowingLayer(ref.keys.clone(), ref.values.clone(), spare)
    for step, L in enumerate([1, 3, 1, 7, 2]):  # spare 0 and 3 force the buffers to grow
        new = _kv(layer.keys.shape[0], L, step + 1)
        k_ref, v_ref = ref.update(*new)
        k, v = layer.update(*new)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert layer.get_seq_length() == ref.get_seq_length()
        if step == 1:  # rows dropped, reordered
            index = torch.tensor([3, 0, 2])
            ref.batch_select_indices(index)
            layer.batch_select_indices(index)
            assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    ref.crop(-4)
    layer.crop(-4)
    assert torch.equal(layer.keys, ref.keys) and layer.get_seq_length() == ref.get_seq_length()
    k, v = layer.update(*_kv(3, 2, 9))  # writes after a crop land where the cropped columns were
    assert torch.equal(k, ref.update(*_kv(3, 2, 9))[0])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)


def test_grow_in_place_converts_only_plain_dynamic_layers() -> None:
    cache = DynamicCache()
    for i in range(3):
        cache.update(*_kv(2, 5, i), layer_idx=i)
    assert grow_in_place(cache, 8)
    assert all(type(layer) is GrowingLayer for layer in cache.layers) and cache.get_seq_length() == 5
    k, _ = cache.update(*_kv(2, 1, 7), layer_idx=1)
    assert k.shape == (2, 2, 6, 4) and cache.get_seq_length(1) == 6
    assert not grow_in_place(cache, 8)  # already converted: nothing to do
    assert not grow_in_place(DynamicCache(), 8)  # no layers yet
