"""Divergences between the student's and the teacher's next-token distributions: pure functions.

The package's other modules follow the same conventions (below): token log-probs and the masked
reductions in `logprobs`, the divergences of a cached top-k teacher in `sparse`, the sequence losses
(`sft_loss`, `kd_loss`, `pt_loss`) in `objectives`, MiniLLM's advantages and policy loss in
`policy_gradient`.

Notation (docs/algorithm.md): `q` is the student (trained, gradient flows into its logits), `p` the
teacher (frozen: its logits are always detached here), `V` the vocabulary, `(B, T)` a batch of token
positions. Conventions shared by every function:

- fp32 inside, whatever the input dtype (bf16 logits are up-cast chunk by chunk).
- `mask` is (B, T), non-zero = valid. Per-token outputs are exactly 0 at masked positions and their
  gradient there is 0 too (no NaN even when a masked row holds garbage or -inf logits).
- -inf logits (top-k / top-p style masking) are allowed: they are replaced by a large finite negative
  number (-1e30) before the softmax, which gives the same probabilities (exactly 0) and keeps every
  `0 · log 0` term at 0 in value and gradient. A KL that is genuinely infinite (the student gives
  probability 0 to an id that the teacher does not) comes out huge but finite.
- Per-token functions return (B, T) values; reductions are left to the caller, which should sum over
  the micro-batch and divide by the valid-token count of the GLOBAL batch (`sum_and_count`), so that
  the gradient does not depend on how the global batch is split into micro-batches, accumulation
  steps or ranks. Sequence losses (`sft_loss`, `kd_loss`, `pt_loss`) return `(sum, count)` for the
  same reason; their token mean is `sum / count.clamp_min(1)`.
- Memory: everything that touches the vocabulary runs in chunks of `chunk_size` positions along T,
  each chunk under activation checkpointing, so the fp32 (B, chunk, V) temporaries exist for one
  chunk at a time in the forward AND the backward pass; only the logits themselves (and their
  gradient) are full size. `chunk_size=None` computes the whole tensor at once without
  checkpointing (the reference the chunked path is tested against).
- Teacher logits wider than the student's (padding rows of the output head) are sliced to the
  student's width (`align_vocab`); a narrower teacher is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from minillm_cli.losses.logprobs import (
    DEFAULT_CHUNK,
    chunked,
    log_softmax_fp32,
    valid_mask,
)


# ----------------------------------------------------------------------------------- helpers
def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Slice the teacher's logits to the student's vocabulary width (a view, no copy).

    Args:
        student_logits: (..., V_s) student logits.
        teacher_logits: (..., V_t) teacher logits with V_t >= V_s (extra ids are padding rows).

    Returns:
        The teacher logits restricted to the first V_s ids, (..., V_s).

    Raises:
        ValueError: the teacher's vocabulary is narrower than the student's.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_t < v_s:
        raise ValueError(f"teacher logits have {v_t} vocabulary entries, fewer than the student's {v_s}")
    return teacher_logits[..., :v_s]


def check_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Check (B, T, V) shapes and return the teacher's logits aligned to the student's vocabulary, detached."""
    if student_logits.dim() != 3:
        raise ValueError(f"student logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    teacher_logits = align_vocab(student_logits, teacher_logits).detach()
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student {tuple(student_logits.shape)}"
        )
    return teacher_logits


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) over the last dim: (B, c, V) log-probs -> (B, c).

    Terms with a_v = 0 are 0 in value and gradient because log-probs are finite (see `log_softmax_fp32`).
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b), the mixture formed in probability space via logaddexp (a logsumexp of two)."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_p, log_q)


def reverse_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_q, log_p)


def tvd_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skew_forward_rows(alpha: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda log_q, log_p: _kl_rows(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_rows(alpha: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda log_q, log_p: _kl_rows(log_q, _log_mix(log_q, log_p, alpha))


def jsd_rows(beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Rows of JSD(β) for 0 < β < 1 (the endpoints are forward / reverse KL, see `generalized_jsd`)."""
    def rows(log_q: Tensor, log_p: Tensor) -> Tensor:
        log_m = _log_mix(log_p, log_q, beta)  # (B, c, V) log(β·p + (1−β)·q)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return rows


def check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _divergence(
    rows: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    """Per-token `rows(log_q, log_p)` over the vocabulary, chunked along T, 0 at masked positions."""
    teacher_logits = check_logits(student_logits, teacher_logits)
    valid = valid_mask(mask, student_logits)  # (B, T)

    def per_chunk(s: Tensor, t: Tensor, m: Tensor) -> Tensor:
        log_q, log_p = log_softmax_fp32(s, m), log_softmax_fp32(t, m)  # (B, c, V) fp32 each
        return torch.where(m, rows(log_q, log_p), 0.0)  # (B, c)

    return chunked(per_chunk, (student_logits, teacher_logits, valid), chunk_size)


# ---------------------------------------------------------------------------- divergences
def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Forward KL per token: `KL[p ‖ q] = Σ_v p_v (log p_v − log q_v)` (mean-seeking, word-level KD).

    Args:
        student_logits: (B, T, V) student logits (q); the gradient flows here.
        teacher_logits: (B, T, V') teacher logits (p), V' >= V, detached.
        mask: optional (B, T), non-zero = valid.
        chunk_size: positions per chunk; None = all at once.

    Returns:
        (B, T) fp32, >= 0 (up to rounding), 0 at masked positions.
    """
    return _divergence(forward_kl_rows, student_logits, teacher_logits, mask, chunk_size)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Reverse KL per token: `KL[q ‖ p] = Σ_v q_v (log q_v − log p_v)` (mode-seeking; MiniLLM's L_reg).

    The chunked path uses the closed-form gradient of `_ReverseKlChunk` (same values, one pass over
    each chunk in the backward instead of autograd through a recomputed graph).

    Args and returns as `forward_kl`.
    """
    if chunk_size is None or student_logits.dim() != 3 or student_logits.shape[1] == 0:
        return _divergence(reverse_kl_rows, student_logits, teacher_logits, mask, chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    teacher_logits = check_logits(student_logits, teacher_logits)
    valid = valid_mask(mask, student_logits)  # (B, T)
    parts = zip(*(x.split(chunk_size, dim=1) for x in (student_logits, teacher_logits, valid)))
    return torch.cat([_ReverseKlChunk.apply(s, t, m) for s, t, m in parts], dim=1)  # (B, T)


class _ReverseKlChunk(torch.autograd.Function):
    """Reverse KL of one chunk of positions with its gradient in closed form.

        KL_t = Σ_v q_v (log q_v − log p_v),    ∂KL_t / ∂s_v = q_v (log q_v − log p_v − KL_t)

    for student logits s (q = softmax(s)). Only the chunk's inputs and its (B, c) result are kept for
    the backward pass, which rebuilds log q and log p once and writes the gradient directly (autograd
    through a checkpointed chunk would recompute the forward and then backpropagate through each of
    its (B, c, V) intermediates). Masked positions give 0 in value and gradient; -inf logits get a
    zero gradient (q_v = 0 there), as in the autograd path.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, m: Tensor) -> Tensor:
        log_q, log_p = log_softmax_fp32(s, m), log_softmax_fp32(t, m)  # (B, c, V) fp32 each
        kl = torch.where(m, _kl_rows(log_q, log_p), 0.0)  # (B, c)
        ctx.save_for_backward(s, t, m, kl)
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        s, t, m, kl = ctx.saved_tensors
        log_q = log_softmax_fp32(s, m)  # (B, c, V)
        weight = torch.where(m, grad_kl, 0.0).unsqueeze(-1)  # (B, c, 1): 0 at masked positions
        grad = log_q.sub(log_softmax_fp32(t, m)).sub_(kl.unsqueeze(-1))  # log q − log p − KL
        grad.mul_(log_q.exp_()).mul_(weight)  # (B, c, V)
        return grad.to(s.dtype), None, None


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, beta: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD, Agarwal et al. 2024).

    For 0 < β < 1, with the mixture formed in probability space (a logsumexp of log-probs):

        m = β·p + (1−β)·q,    JSD(β) = β·KL(p ‖ m) + (1−β)·KL(q ‖ m).

    The endpoints follow the GKD convention: β = 0 is exactly `forward_kl` (KL[p ‖ q]) and β = 1 exactly
    `reverse_kl` (KL[q ‖ p]). These are the limits of JSD(β)/β for β → 0 and JSD(β)/(1−β) for β → 1
    (JSD(β) itself tends to 0 at both ends), so the value is discontinuous in β at 0 and 1.
    β = 0.5 gives the symmetric JSD.

    Args:
        student_logits: (B, T, V) student logits (q); the gradient flows here.
        teacher_logits: (B, T, V') teacher logits (p), V' >= V, detached.
        mask: optional (B, T), non-zero = valid.
        beta: β in [0, 1].
        chunk_size: positions per chunk; None = all at once.

    Returns:
        (B, T) fp32, >= 0 (up to rounding), 0 at masked positions.
    """
    check_weight("beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, chunk_size=chunk_size)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, chunk_size=chunk_size)
    return _divergence(jsd_rows(beta), student_logits, teacher_logits, mask, chunk_size)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, alpha: float = 0.1,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Skew KL per token (DistiLLM, Ko et al. 2024): `KL(p ‖ α·p + (1−α)·q)`; α = 0 is forward KL.

    Args:
        alpha: α in [0, 1]; the mixture is formed in probability space. Other args as `forward_kl`.

    Returns:
        (B, T) fp32, >= 0 (up to rounding), 0 at masked positions.
    """
    check_weight("alpha", alpha)
    return _divergence(skew_forward_rows(alpha), student_logits, teacher_logits, mask, chunk_size)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, alpha: float = 0.1,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Skew reverse KL per token (DistiLLM): `KL(q ‖ α·q + (1−α)·p)`; α = 0 is reverse KL.

    Args:
        alpha: α in [0, 1]; the mixture is formed in probability space. Other args as `forward_kl`.

    Returns:
        (B, T) fp32, >= 0 (up to rounding), 0 at masked positions.
    """
    check_weight("alpha", alpha)
    return _divergence(skew_reverse_rows(alpha), student_logits, teacher_logits, mask, chunk_size)


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Total variation distance per token: `TVD(p, q) = ½ Σ_v |p_v − q_v|`, in [0, 1].

    Args and returns as `forward_kl`.
    """
    return _divergence(tvd_rows, student_logits, teacher_logits, mask, chunk_size)


def teacher_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Cross-entropy from the teacher's softmax to the student per token: `CE(p, q) = −Σ_v p_v log q_v`.

    Equals `forward_kl + H(p)`: the same gradient as forward KL, but not 0 for identical inputs.
    This is the KD term of word-level KD and of the pre-training loss.

    Args and returns as `forward_kl` (values are >= H(p) instead of >= 0).
    """
    return _divergence(lambda log_q, log_p: -(log_p.exp() * log_q).sum(-1),
                       student_logits, teacher_logits, mask, chunk_size)
