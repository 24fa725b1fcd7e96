"""Properties and hand-computed values of `minillm_cli.losses` (divergences, LM losses), `logprobs` (token
log-probs, reductions) and `policy_gradient` (advantages, PPO loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from minillm_cli.losses import divergences as divergences_mod
from minillm_cli.losses import logprobs, objectives, policy_gradient

DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": divergences_mod.forward_kl,
    "reverse_kl": divergences_mod.reverse_kl,
    "jsd_0.3": partial(divergences_mod.generalized_jsd, beta=0.3),
    "jsd_0.5": partial(divergences_mod.generalized_jsd, beta=0.5),
    "skew_forward_kl": partial(divergences_mod.skew_forward_kl, alpha=0.1),
    "skew_reverse_kl": partial(divergences_mod.skew_reverse_kl, alpha=0.1),
    "tvd": divergences_mod.tvd,
}
ALL_PER_TOKEN = {**DIVERGENCES, "teacher_ce": divergences_mod.teacher_cross_entropy}


def random_batch(seed: int, B: int = 3, T: int = 7, V: int = 11, scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits (leaf with grad), teacher logits and a mask with a short row and a fully masked row."""
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(B, T, V, generator=gen)).requires_grad_()
    t = scale * torch.randn(B, T, V, generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # early EOS
    mask[2] = 0  # fully masked row
    return s, t, mask


def probs_logits(*rows: list[float]) -> Tensor:
    """(1, len(rows), V) logits whose softmax is exactly the given probability rows (log of them)."""
    return torch.tensor(rows).log().unsqueeze(0)


# ----------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_on_identical_inputs(name: str, seed: int) -> None:
    s, _, mask = random_batch(seed)
    div = DIVERGENCES[name](s, s.detach().clone(), mask)
    assert div.dtype == torch.float32 and div.shape == mask.shape
    assert float(div.detach().abs().max()) < 1e-6
    (grad,) = torch.autograd.grad(div.sum(), s)
    assert float(grad.abs().max()) < 1e-6


def test_hand_values_two_ids() -> None:
    # q = (0.25, 0.75) (student), p = (0.5, 0.5) (teacher), one position
    q, p = [0.25, 0.75], [0.5, 0.5]
    s, t = probs_logits(q), probs_logits(p)

    def kl(a: list[float], b: list[float]) -> float:
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))

    expected = {
        "forward_kl": 0.5 * math.log(4 / 3),  # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        # m = 0.3 p + 0.7 q = (0.325, 0.675)
        "jsd_0.3": 0.3 * kl(p, [0.325, 0.675]) + 0.7 * kl(q, [0.325, 0.675]),
        # m = (0.375, 0.625)
        "jsd_0.5": 0.5 * kl(p, [0.375, 0.625]) + 0.5 * kl(q, [0.375, 0.625]),
        "skew_forward_kl": kl(p, [0.275, 0.725]),  # m = 0.1 p + 0.9 q
        "skew_reverse_kl": kl(q, [0.475, 0.525]),  # m = 0.1 q + 0.9 p
        "tvd": 0.25,  # ½ (|0.5 − 0.25| + |0.5 − 0.75|)
        "teacher_ce": -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)),
    }
    for name, fn in ALL_PER_TOKEN.items():
        assert float(fn(s, t)[0, 0]) == pytest.approx(expected[name], rel=1e-5), name


def test_kl_gradient_is_q_minus_p() -> None:
    # ∂ KL[p‖q] / ∂ student logits = q − p, the textbook KD gradient
    s, t, mask = random_batch(5)
    (grad,) = torch.autograd.grad(divergences_mod.forward_kl(s, t, mask).sum(), s)
    expected = (torch.softmax(s, -1) - torch.softmax(t, -1)) * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, expected.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jsd_endpoints_are_exactly_forward_and_reverse_kl(seed: int) -> None:
    s, t, mask = random_batch(seed)
    assert torch.equal(divergences_mod.generalized_jsd(s, t, mask, beta=0.0), divergences_mod.forward_kl(s, t, mask))
    assert torch.equal(divergences_mod.generalized_jsd(s, t, mask, beta=1.0), divergences_mod.reverse_kl(s, t, mask))
    # the documented convention: the endpoints are the limits of JSD(β)/β and JSD(β)/(1−β)
    # (the gap shrinks like β·χ², so use moderate logits; fp32 limits how small β can go)
    s, t, mask = random_batch(seed, scale=1.0)
    eps = 1e-3
    valid = mask.bool()
    near0 = divergences_mod.generalized_jsd(s, t, mask, beta=eps) / eps
    near1 = divergences_mod.generalized_jsd(s, t, mask, beta=1 - eps) / eps
    torch.testing.assert_close(near0[valid], divergences_mod.forward_kl(s, t, mask)[valid], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(near1[valid], divergences_mod.reverse_kl(s, t, mask)[valid], rtol=1e-2, atol=1e-4)


def test_skew_endpoints() -> None:
    s, t, mask = random_batch(3)
    torch.testing.assert_close(divergences_mod.skew_forward_kl(s, t, mask, alpha=0.0), divergences_mod.forward_kl(s, t, mask))
    torch.testing.assert_close(divergences_mod.skew_reverse_kl(s, t, mask, alpha=0.0), divergences_mod.reverse_kl(s, t, mask))
    assert float(divergences_mod.skew_forward_kl(s, t, mask, alpha=1.0).detach().abs().max()) < 1e-6
    assert float(divergences_mod.skew_reverse_kl(s, t, mask, alpha=1.0).detach().abs().max()) < 1e-6
    with pytest.raises(ValueError, match="alpha"):
        divergences_mod.skew_forward_kl(s, t, mask, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        divergences_mod.generalized_jsd(s, t, mask, beta=-0.1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20), scale=st.floats(0.01, 40.0), beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 1.0))
def test_never_negative(seed: int, scale: float, beta: float, alpha: float) -> None:
    s, t, mask = random_batch(seed, scale=scale)
    fns = {**DIVERGENCES, "jsd": partial(divergences_mod.generalized_jsd, beta=beta),
           "skf": partial(divergences_mod.skew_forward_kl, alpha=alpha), "skr": partial(divergences_mod.skew_reverse_kl, alpha=alpha)}
    with torch.no_grad():
        for name, fn in fns.items():
            div = fn(s, t, mask)
            assert bool(torch.isfinite(div).all()), name
            assert float(div.min()) >= -1e-6, name
            assert float(div[mask == 0].abs().max()) == 0.0, name
        assert float(divergences_mod.tvd(s, t, mask).max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("name", ALL_PER_TOKEN)
def test_no_nan_on_masked_rows_with_garbage_logits(name: str) -> None:
    s, t, mask = random_batch(4)
    with torch.no_grad():
        s[2, :, :] = float("nan")  # fully masked row holding garbage
        s[1, 5, :] = float("-inf")  # masked position, all -inf
        t[2, 0, :] = float("inf")
    div = ALL_PER_TOKEN[name](s, t, mask, chunk_size=3)
    assert bool(torch.isfinite(div).all())
    assert float(div.detach()[mask == 0].abs().max()) == 0.0
    (grad,) = torch.autograd.grad(div.sum(), s)
    assert bool(torch.isfinite(grad).all())
    assert float(grad[mask == 0].abs().max()) == 0.0


@pytest.mark.parametrize("name", ALL_PER_TOKEN)
def test_minus_inf_logits_match_the_restricted_vocabulary(name: str) -> None:
    # top-k style masking: ids 0..3 are -inf in both models at every position. Value and gradient
    # must equal those on the vocabulary without these ids, and the gradient on them must be 0.
    s, t, mask = random_batch(6)
    s_inf, t_inf = s.detach().clone(), t.clone()
    s_inf[..., :4] = float("-inf")
    t_inf[..., :4] = float("-inf")
    s_inf.requires_grad_()
    fn = ALL_PER_TOKEN[name]
    div = fn(s_inf, t_inf, mask, chunk_size=2)
    (grad,) = torch.autograd.grad(div.sum(), s_inf)
    s_small = s.detach()[..., 4:].clone().requires_grad_()
    ref = fn(s_small, t[..., 4:], mask)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_small)
    torch.testing.assert_close(div, ref)
    torch.testing.assert_close(grad[..., 4:], ref_grad)
    assert float(grad[..., :4].abs().max()) == 0.0


def test_minus_inf_where_only_one_side_is_zero() -> None:
    # teacher -inf (p = 0) with a finite student: forward KL is finite; student -inf (q = 0) with a
    # finite teacher: reverse KL is finite. Both equal the restricted-vocabulary value plus the mass term.
    s, t, mask = random_batch(7)
    t_inf = t.clone()
    t_inf[..., 0] = float("-inf")
    div = divergences_mod.forward_kl(s, t_inf, mask, chunk_size=2)
    (grad,) = torch.autograd.grad(div.sum(), s)
    assert bool(torch.isfinite(div).all()) and bool(torch.isfinite(grad).all())
    expected = (torch.softmax(s, -1) - torch.softmax(t_inf, -1)) * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, expected.detach(), atol=1e-5, rtol=1e-4)
    s_inf = s.detach().clone()
    s_inf[..., 0] = float("-inf")
    s_inf.requires_grad_()
    div = divergences_mod.reverse_kl(s_inf, t, mask)
    (grad,) = torch.autograd.grad(div.sum(), s_inf)
    assert bool(torch.isfinite(div).all()) and bool(torch.isfinite(grad).all())
    assert float(div.detach().min()) >= 0.0


# ------------------------------------------------------------------------ chunked vs dense
@pytest.mark.parametrize("name", ALL_PER_TOKEN)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_chunked_equals_dense(name: str, chunk_size: int) -> None:
    s, t, mask = random_batch(8)
    fn = ALL_PER_TOKEN[name]
    dense = fn(s, t, mask, chunk_size=None)
    chunked = fn(s, t, mask, chunk_size=chunk_size)
    weights = torch.randn(dense.shape, generator=torch.Generator().manual_seed(0))  # a non-trivial upstream grad
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), s)
    (g_chunk,) = torch.autograd.grad((chunked * weights).sum(), s)
    torch.testing.assert_close(chunked, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunk, g_dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_token_logprobs(chunk_size: int | None) -> None:
    s, _, mask = random_batch(9)
    tokens = torch.randint(0, s.shape[-1], mask.shape, generator=torch.Generator().manual_seed(1))
    tokens[mask == 0] = -100  # labels-style ignore ids are fine where masked
    out = logprobs.token_logprobs(s, tokens, mask, chunk_size=chunk_size)
    expected = torch.log_softmax(s, -1).gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), s)
    (ref_grad,) = torch.autograd.grad(expected.sum(), s)
    torch.testing.assert_close(grad, ref_grad)
    assert float(out.detach()[mask == 0].abs().max()) == 0.0


def test_bf16_inputs_give_fp32_outputs_and_chunking_agrees() -> None:
    s, t, mask = random_batch(10)
    s16 = s.detach().bfloat16().requires_grad_()
    t16 = t.bfloat16()
    dense = divergences_mod.reverse_kl(s16, t16, mask, chunk_size=None)
    chunked = divergences_mod.reverse_kl(s16, t16, mask, chunk_size=2)
    assert dense.dtype == torch.float32 and chunked.dtype == torch.float32
    (g_dense,) = torch.autograd.grad(dense.sum(), s16)
    (g_chunk,) = torch.autograd.grad(chunked.sum(), s16)
    assert g_chunk.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(g_chunk, g_dense)
    # fp32 inside: the bf16 result equals the fp32 computation on the same (bf16-rounded) numbers
    torch.testing.assert_close(dense, divergences_mod.reverse_kl(s16.detach().float(), t16.float(), mask, chunk_size=None))


def _saved_numels(fn: Callable[[], Tensor]) -> list[int]:
    """Sizes of the tensors autograd keeps for the backward pass while `fn` runs (outside checkpoints)."""
    sizes: list[int] = []

    def pack(x: Tensor) -> Tensor:
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sizes


@pytest.mark.parametrize("name", ["forward_kl", "jsd_0.5", "teacher_ce"])
def test_chunked_forward_keeps_no_full_size_fp32_tensor(name: str) -> None:
    # Dense mode keeps several (B, T, V) fp32 tensors for backward; chunked mode keeps none (each
    # chunk is recomputed in the backward pass), so memory between forward and backward is O(inputs).
    s, t, mask = random_batch(11, T=32)
    full = s.numel()
    fn = ALL_PER_TOKEN[name]
    dense = _saved_numels(lambda: fn(s, t, mask, chunk_size=None))
    chunked = _saved_numels(lambda: fn(s, t, mask, chunk_size=4))
    assert max(dense) >= full  # the hook sees the dense intermediates
    assert max(chunked, default=0) < full // 4
    tokens = torch.zeros(mask.shape, dtype=torch.long)
    assert max(_saved_numels(lambda: logprobs.token_logprobs(s, tokens, chunk_size=4)), default=0) < full // 4


class _FullSizeOps(TorchDispatchMode):
    """Records every op whose output has at least `full` elements."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full = full
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, Tensor) and o.numel() >= self.full:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("name", ["reverse_kl", "jsd_0.5"])
def test_chunked_backward_creates_no_full_size_intermediate(name: str) -> None:
    # Dense backward materialises a score of (B, T, V) tensors; chunked backward recomputes one chunk
    # at a time, so the only full-size tensor it creates is the logits' gradient itself (the final cat).
    s, t, mask = random_batch(11, T=32)
    fn = ALL_PER_TOKEN[name]
    for chunk_size, allowed in ((None, None), (4, 2)):
        out = fn(s, t, mask, chunk_size=chunk_size)
        mode = _FullSizeOps(s.numel())
        with mode:
            out.sum().backward()
        if allowed is None:
            assert len(mode.ops) > 10  # the probe sees dense intermediates
        else:
            assert mode.ops[0] == "aten.cat.default" and len(mode.ops) <= allowed, mode.ops


def test_align_vocab() -> None:
    s, t, mask = random_batch(12, V=11)
    wide = torch.cat([t, torch.full((*t.shape[:2], 5), 30.0)], dim=-1)  # padding rows with big logits
    assert divergences_mod.align_vocab(s, wide).shape == s.shape
    torch.testing.assert_close(divergences_mod.forward_kl(s, wide, mask), divergences_mod.forward_kl(s, t, mask))
    with pytest.raises(ValueError, match="fewer than the student"):
        divergences_mod.align_vocab(s, t[..., :5])
    with pytest.raises(ValueError, match="fewer than the student"):
        divergences_mod.reverse_kl(s, t[..., :5], mask)


# --------------------------------------------------------- micro-batch × accumulation invariance
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.5", "teacher_ce"])
def test_micro_batch_accumulation_equivalence(name: str) -> None:
    # A global batch of 6 rows with different valid lengths: the whole-batch token mean and its
    # gradient equal the sum over micro-batches (any split) of micro sums / GLOBAL count.
    gen = torch.Generator().manual_seed(13)
    s = torch.randn(6, 5, 7, generator=gen).requires_grad_()
    t = torch.randn(6, 5, 7, generator=gen)
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 0, 4, 2]).unsqueeze(-1)).long()  # (6, 5)
    fn = ALL_PER_TOKEN[name]
    whole = logprobs.masked_mean(fn(s, t, mask), mask)
    (g_whole,) = torch.autograd.grad(whole, s)
    _, global_count = logprobs.sum_and_count(torch.zeros(mask.shape), mask)
    assert int(global_count) == 15
    for split in ([2, 2, 2], [1, 5], [4, 1, 1]):
        s.grad = None
        total = torch.zeros(())
        start = 0
        for size in split:  # one micro-batch per accumulation step, gradients accumulate in s.grad
            rows = slice(start, start + size)
            start += size
            micro_sum, _ = logprobs.sum_and_count(fn(s[rows], t[rows], mask[rows], chunk_size=2), mask[rows])
            loss = micro_sum / global_count.clamp_min(1)
            loss.backward()
            total = total + loss.detach()
        torch.testing.assert_close(total, whole.detach())
        torch.testing.assert_close(s.grad, g_whole)


def test_masked_mean_and_sum_and_count() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = logprobs.sum_and_count(values, mask)
    assert float(total) == 7.0 and int(count) == 3
    assert float(logprobs.masked_mean(values, mask)) == pytest.approx(7 / 3)
    assert float(logprobs.masked_mean(values, torch.zeros_like(mask))) == 0.0  # nothing valid: 0, not NaN


# ------------------------------------------------------------------------ SFT / KD / PT losses
def lm_example() -> tuple[Tensor, Tensor, Tensor]:
    # positions: 0 -> q = (0.25, 0.75), 1 -> q = (0.5, 0.5), 2 -> anything (predicts nothing)
    s = probs_logits([0.25, 0.75], [0.5, 0.5], [0.9, 0.1])
    # teacher: 0 -> p = (0.5, 0.5), 1 -> p = (0.75, 0.25)
    t = probs_logits([0.5, 0.5], [0.75, 0.25], [0.3, 0.7])
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts id 1, position 1 predicts id 0
    return s, t, labels


def test_sft_loss_hand_example() -> None:
    s, _, labels = lm_example()
    total, count = objectives.sft_loss(s, labels)
    assert int(count) == 2
    assert float(total) == pytest.approx(-math.log(0.75) - math.log(0.5), rel=1e-6)
    total, count = objectives.sft_loss(s, torch.tensor([[7, -100, -100]]))  # nothing to predict
    assert float(total) == 0.0 and int(count) == 0


def test_kd_and_pt_loss_hand_example() -> None:
    s, t, labels = lm_example()
    k = 0.5
    nll = -math.log(0.75) - math.log(0.5)
    ce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - (0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    total, count = objectives.kd_loss(s, t, labels, kd_ratio=k)
    assert int(count) == 2
    assert float(total) == pytest.approx((1 - k) * nll + k * ce, rel=1e-6)
    pt_total, pt_count = objectives.pt_loss(s, labels, t, kd_ratio=k, chunk_size=1)
    assert float(pt_total) == pytest.approx(float(total), rel=1e-6) and int(pt_count) == 2
    lm_total, _ = objectives.pt_loss(s, labels, None)
    assert float(lm_total) == pytest.approx(nll, rel=1e-6)
    k0, _ = objectives.kd_loss(s, t, labels, kd_ratio=0.0)
    assert float(k0) == pytest.approx(nll, rel=1e-6)
    # a wider teacher head (padding rows) is sliced to the student's ids
    wide = torch.cat([t, torch.zeros(1, 3, 2)], dim=-1)
    assert float(objectives.kd_loss(s, wide, labels, kd_ratio=k)[0]) == pytest.approx(float(total), rel=1e-6)


def test_kd_loss_chunked_equals_dense() -> None:
    s, t, _ = random_batch(14, T=9)
    labels = torch.randint(0, s.shape[-1], (3, 9), generator=torch.Generator().manual_seed(2))
    labels[:, :3] = -100
    labels[1, 6:] = -100
    dense, count = objectives.kd_loss(s, t, labels, kd_ratio=0.3, chunk_size=None)
    chunked, _ = objectives.kd_loss(s, t, labels, kd_ratio=0.3, chunk_size=2)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_chunk,) = torch.autograd.grad(chunked, s)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(g_chunk, g_dense)


# ------------------------------------------------------------------------------ advantages
# Four rows, T = 4 (x = padding; its reward must never leak):
#   row 0: r = [1, 2, 4, x=100], EOS at t=2, right padding
#   row 1: r = [2, 0, -2, 8],    full length
#   row 2: r = [3, x, x, x],     EOS at t=0
#   row 3: r = [x=50, 1, 2, 4],  LEFT padding: must equal row 0 shifted by one (relative positions)
#   row 4: r = [1, x=77, 2, 4],  a hole: must equal row 0 with the hole inserted (no discount step there)
REWARDS = torch.tensor([[1.0, 2.0, 4.0, 100.0], [2.0, 0.0, -2.0, 8.0], [3.0, 9.0, 9.0, 9.0], [50.0, 1.0, 2.0, 4.0],
                        [1.0, 77.0, 2.0, 4.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 1], [1, 0, 1, 1]])

# remaining valid tokens n_t:  row 0 [3, 2, 1], row 1 [4, 3, 2, 1], row 2 [1]
# (include_current=False divides by max(n_t − 1, 1): row 0 [2, 1, 1], row 1 [3, 2, 1, 1], row 2 [1])
HAND = {
    # γ = 1, G_t = Σ_{t'≥t} r: row 0 [7, 6, 4]; row 1 [8, 6, 6, 8]; row 2 [3]
    (1.0, True, False): [[7, 6, 4, 0], [8, 6, 6, 8], [3, 0, 0, 0]],
    # ... / n_t: row 0 [7/3, 3, 4]; row 1 [2, 2, 3, 8]
    (1.0, True, True): [[7 / 3, 3, 4, 0], [2, 2, 3, 8], [3, 0, 0, 0]],
    # γ = 1, G_t = Σ_{t'>t} r: row 0 [6, 4, 0]; row 1 [6, 6, 8, 0]; row 2 [0]
    (1.0, False, False): [[6, 4, 0, 0], [6, 6, 8, 0], [0, 0, 0, 0]],
    # ... / max(n_t − 1, 1): row 0 [6/2, 4/1, 0]; row 1 [6/3, 6/2, 8/1, 0]
    (1.0, False, True): [[3, 4, 0, 0], [2, 3, 8, 0], [0, 0, 0, 0]],
    # γ = 0.5, G_t = r_t + 0.5 G_{t+1}: row 0: G2 = 4, G1 = 2 + 2 = 4, G0 = 1 + 2 = 3
    #   row 1: G3 = 8, G2 = -2 + 4 = 2, G1 = 0 + 1 = 1, G0 = 2 + 0.5 = 2.5; row 2: [3]
    (0.5, True, False): [[3, 4, 4, 0], [2.5, 1, 2, 8], [3, 0, 0, 0]],
    # ... / n_t: row 0 [1, 2, 4]; row 1 [0.625, 1/3, 1, 8]
    (0.5, True, True): [[1, 2, 4, 0], [0.625, 1 / 3, 1, 8], [3, 0, 0, 0]],
    # γ = 0.5, G_t = Σ_{t'>t} 0.5^(t'−t) r = 0.5·G^incl_{t+1}: row 0: [0.5·4, 0.5·4, 0] = [2, 2, 0]
    #   row 1: [0.5·1, 0.5·2, 0.5·8, 0] = [0.5, 1, 4, 0]   (check t=0: 0.5·0 + 0.25·(−2) + 0.125·8 = 0.5)
    (0.5, False, False): [[2, 2, 0, 0], [0.5, 1, 4, 0], [0, 0, 0, 0]],
    # ... / max(n_t − 1, 1): row 0 [2/2, 2/1, 0]; row 1 [0.5/3, 1/2, 4/1, 0]
    (0.5, False, True): [[1, 2, 0, 0], [1 / 6, 0.5, 4, 0], [0, 0, 0, 0]],
}


@pytest.mark.parametrize("key", HAND, ids=[f"gamma{g}-cur{c}-norm{n}" for g, c, n in HAND])
def test_advantages_hand_examples(key: tuple[float, bool, bool]) -> None:
    gamma, include_current, length_norm = key
    adv = policy_gradient.advantages(REWARDS, MASK, gamma=gamma, include_current=include_current, length_norm=length_norm,
                            whiten=False)
    expected = torch.tensor(HAND[key], dtype=torch.float32)
    torch.testing.assert_close(adv[:3], expected)
    # row 3 is row 0 behind one left-padding position: same numbers, shifted
    torch.testing.assert_close(adv[3], torch.cat([torch.zeros(1), expected[0, :3]]))
    torch.testing.assert_close(adv[4], torch.stack([expected[0, 0], torch.tensor(0.0), expected[0, 1], expected[0, 2]]))


def test_advantages_whitening() -> None:
    adv = policy_gradient.advantages(REWARDS, MASK, gamma=1.0, include_current=True, length_norm=True, whiten=True)
    raw = torch.tensor([7 / 3, 3, 4, 2, 2, 3, 8, 3, 7 / 3, 3, 4, 7 / 3, 3, 4])  # the 14 valid Â_t in row order
    mean, var = raw.mean(), raw.var(unbiased=False)
    expected = torch.zeros(5, 4)
    expected[MASK.bool()] = (raw - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(adv, expected)
    valid = adv[MASK.bool()]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.var(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert float(adv[MASK == 0].abs().max()) == 0.0
    # nothing valid at all: zeros, no NaN
    empty = policy_gradient.advantages(REWARDS, torch.zeros_like(MASK))
    assert float(empty.abs().max()) == 0.0


def test_advantages_whitening_is_global_across_ranks() -> None:
    # Two simulated data-parallel ranks: with reduce_fn summing both ranks' statistics, each rank's
    # rows equal the corresponding rows of the single-process result on the whole buffer.
    whole = policy_gradient.advantages(REWARDS, MASK, gamma=0.95)
    shards = [(REWARDS[:1], MASK[:1]), (REWARDS[1:], MASK[1:])]
    local: list[Tensor] = []
    for r, m in shards:  # pass 1: what each rank would contribute to the all-reduce
        policy_gradient.advantages(r, m, gamma=0.95, reduce_fn=lambda x: local.append(x.clone()) or x)
    assert len(local) == 2  # one all-reduce per call
    total = local[0] + local[1]
    parts = [policy_gradient.advantages(r, m, gamma=0.95, reduce_fn=lambda x: total) for r, m in shards]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_advantages_are_detached_and_float32() -> None:
    rewards = REWARDS.clone().requires_grad_()
    adv = policy_gradient.advantages(rewards, MASK)
    assert adv.dtype == torch.float32 and not adv.requires_grad


# ----------------------------------------------------------------------------- policy loss
def test_policy_loss_clipping_hand_example() -> None:
    # logq_new = logq_old, so ρ = w = exp(log_w); ε = 0.2, clip range [0.8, 1.2]
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0, 3.0]])
    adv = torch.tensor([[2.0, 2.0, -2.0, -2.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    logq_old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -9.0]])
    logq_new = logq_old.clone().requires_grad_()
    loss, clip_frac = policy_gradient.policy_loss(logq_new, logq_old, ratio.log(), adv, mask, clip_eps=0.2)
    # A > 0, ρ = 1.5: max(−3, −2.4) = −2.4 (clipped, no gradient)
    # A > 0, ρ = 0.5: max(−1, −1.6) = −1   (unclipped: gradient −A·ρ = −1)
    # A < 0, ρ = 1.5: max(3, 2.4) = 3      (unclipped: gradient −A·ρ = 3)
    # A < 0, ρ = 0.5: max(1, 1.6) = 1.6    (clipped, no gradient)
    # ρ = 1: −A = −2 (gradient −2); masked: 0
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -1.0, 3.0, 1.6, -2.0, 0.0]]))
    assert float(clip_frac) == pytest.approx(2 / 5)
    (grad,) = torch.autograd.grad(loss.sum(), logq_new)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0, 3.0, 0.0, -2.0, 0.0]]))


def test_policy_loss_without_clipping() -> None:
    ratio = torch.tensor([[1.5, 0.5, 3.0]])
    adv = torch.tensor([[2.0, -2.0, 1.0]])
    mask = torch.tensor([[1, 1, 1]])
    logq_new = torch.zeros(1, 3).requires_grad_()
    loss, clip_frac = policy_gradient.policy_loss(logq_new, torch.zeros(1, 3), ratio.log(), adv, mask, clip_eps=None)
    torch.testing.assert_close(loss, torch.tensor([[-3.0, 1.0, -3.0]]))
    assert float(clip_frac) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logq_new)
    torch.testing.assert_close(grad, torch.tensor([[-3.0, 1.0, -3.0]]))  # −A·ρ·∇log q


def test_policy_loss_masked_garbage_is_zero() -> None:
    logq_new = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    logq_old = torch.tensor([[-1.0, float("-inf")]])
    log_w = torch.tensor([[0.0, float("nan")]])
    adv = torch.tensor([[1.0, float("nan")]])
    loss, clip_frac = policy_gradient.policy_loss(logq_new, logq_old, log_w, adv, torch.tensor([[1, 0]]))
    assert loss.tolist() == [[-1.0, 0.0]] and float(clip_frac) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logq_new)
    assert grad.tolist() == [[-1.0, 0.0]]
