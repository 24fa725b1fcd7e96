"""Divergences and language-modelling losses: pure functions.

Token log-probs and the masked reductions (`token_logprobs`, `sum_and_count`, `masked_mean`) live in
`minillm_cli.logprobs`, MiniLLM's advantages and policy loss in `minillm_cli.policy_gradient`; both
follow the conventions below.

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

from minillm_cli.logprobs import (
    _NEG_LOGIT,
    DEFAULT_CHUNK,
    _clean_logits,
    chunked,
    log_softmax_fp32,
    token_logprobs,
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


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
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


def _forward_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_p, log_q)


def _reverse_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_q, log_p)


def _tvd_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _skew_forward_rows(alpha: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda log_q, log_p: _kl_rows(log_p, _log_mix(log_p, log_q, alpha))


def _skew_reverse_rows(alpha: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda log_q, log_p: _kl_rows(log_q, _log_mix(log_q, log_p, alpha))


def _jsd_rows(beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Rows of JSD(β) for 0 < β < 1 (the endpoints are forward / reverse KL, see `generalized_jsd`)."""
    def rows(log_q: Tensor, log_p: Tensor) -> Tensor:
        log_m = _log_mix(log_p, log_q, beta)  # (B, c, V) log(β·p + (1−β)·q)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return rows


def _check_weight(name: str, value: float) -> None:
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
    teacher_logits = _check_logits(student_logits, teacher_logits)
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
    return _divergence(_forward_kl_rows, student_logits, teacher_logits, mask, chunk_size)


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
        return _divergence(_reverse_kl_rows, student_logits, teacher_logits, mask, chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    teacher_logits = _check_logits(student_logits, teacher_logits)
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
    _check_weight("beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, chunk_size=chunk_size)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, chunk_size=chunk_size)
    return _divergence(_jsd_rows(beta), student_logits, teacher_logits, mask, chunk_size)


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
    _check_weight("alpha", alpha)
    return _divergence(_skew_forward_rows(alpha), student_logits, teacher_logits, mask, chunk_size)


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
    _check_weight("alpha", alpha)
    return _divergence(_skew_reverse_rows(alpha), student_logits, teacher_logits, mask, chunk_size)


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Total variation distance per token: `TVD(p, q) = ½ Σ_v |p_v − q_v|`, in [0, 1].

    Args and returns as `forward_kl`.
    """
    return _divergence(_tvd_rows, student_logits, teacher_logits, mask, chunk_size)


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


# ------------------------------------------------------- sparse teacher (cached top-k log-probs)
def teacher_top_k(
    teacher_logits: Tensor, k: int, mask: Tensor | None = None, *, chunk_size: int | None = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's distribution reduced to its `k` most likely ids plus one tail bucket (what a
    teacher cache stores per position; `sparse_divergence` consumes it).

    Args:
        teacher_logits: (B, T, V) teacher logits (already sliced to the student's width).
        k: ids kept per position, 1 <= k <= V.
        mask: optional (B, T), non-zero = valid; masked positions give ids 0, log-probs -1e30, tail 0.
        chunk_size: positions per chunk (bounds the fp32 (B, chunk, V) temporaries); None = all at once.

    Returns:
        `(ids, logprobs, tail)`: (B, T, k) int64 ids in decreasing probability, (B, T, k) fp32 their
        log-probs, (B, T) fp32 the log of the remaining mass `log(1 − Σ_top p)`, computed as a
        logsumexp over the other ids (no cancellation; -1e30 when k = V: the tail is empty).
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher logits must be (B, T, V), got shape {tuple(teacher_logits.shape)}")
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be in [1, {teacher_logits.shape[-1]}], got {k}")
    valid = valid_mask(mask, teacher_logits)  # (B, T)
    T = teacher_logits.shape[1]
    step = chunk_size or max(T, 1)
    ids, logps, tails = [], [], []
    for a in range(0, max(T, 1), step):
        t, m = teacher_logits[:, a : a + step].detach(), valid[:, a : a + step]
        log_p = log_softmax_fp32(t, m)  # (B, c, V)
        top = log_p.topk(k, dim=-1)  # (B, c, k) each
        tail = torch.logsumexp(log_p.scatter(-1, top.indices, _NEG_LOGIT), dim=-1)  # (B, c)
        ids.append(torch.where(m.unsqueeze(-1), top.indices, 0))
        logps.append(torch.where(m.unsqueeze(-1), top.values, _NEG_LOGIT))
        tails.append(torch.where(m, tail.clamp_min(_NEG_LOGIT), 0.0))
    return torch.cat(ids, dim=1), torch.cat(logps, dim=1), torch.cat(tails, dim=1)


def sparse_rows(loss: str, *, alpha: float = 0.1, beta: float = 0.5) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-position divergence `rows(log_q, log_p)` of `method.loss` (names as in config.KdMethod).

    Every divergence here is a sum over outcomes, so it applies unchanged to the coarse (k + 1)-outcome
    distributions of `sparse_divergence`.
    """
    if loss in ("skew_forward_kl", "skew_reverse_kl"):
        _check_weight("alpha", alpha)
    if loss == "jsd":
        _check_weight("beta", beta)
    table: dict[str, Callable[[], Callable[[Tensor, Tensor], Tensor]]] = {
        "forward_kl": lambda: _forward_kl_rows,
        "reverse_kl": lambda: _reverse_kl_rows,
        "skew_forward_kl": lambda: _skew_forward_rows(alpha),
        "skew_reverse_kl": lambda: _skew_reverse_rows(alpha),
        "tvd": lambda: _tvd_rows,
        "jsd": lambda: _forward_kl_rows if beta == 0.0 else _reverse_kl_rows if beta == 1.0 else _jsd_rows(beta),
    }
    if loss not in table:
        raise ValueError(f"unknown divergence {loss!r} (one of {', '.join(table)})")
    return table[loss]()


def sparse_divergence(
    student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
    mask: Tensor | None = None, *, loss: str = "forward_kl", alpha: float = 0.1, beta: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Per-token divergence between the student and a teacher known only by its top-k (a teacher cache).

    Both distributions are coarse-grained to k + 1 outcomes: the teacher's k cached ids, and one tail
    bucket holding everything else. The teacher's side is its cached log-probs and remaining mass
    (renormalised over the k + 1 outcomes, which absorbs the rounding of fp16 storage); the student's
    side is its log-probs at the same ids and the log of its mass outside them (a logsumexp over the
    other ids, no cancellation). `loss` (config.KdMethod.loss) is then computed exactly on these two
    (k + 1)-outcome distributions:

        D_k(p, q) = D((p_1..p_k, p_tail), (q_1..q_k, q_tail))

    With k = V the tail is empty and D_k = D up to float rounding. With k < V, D_k <= D for every
    f-divergence here (KL, skew KL, TVD, JSD: merging outcomes never increases them), and the
    gradient ignores how the student spreads its tail mass over the ids outside the teacher's top-k
    (README, "Teacher cache": the measured error).

    Args:
        student_logits: (B, T, V) student logits (q); the gradient flows here.
        teacher_ids: (B, T, k) integer ids (< V) of the teacher's top-k; any value at masked positions.
        teacher_logprobs: (B, T, k) their teacher log-probs, any float dtype (fp16 storage is fine).
        teacher_tail: (B, T) log of the teacher's remaining mass (-inf or -1e30: none).
        mask: optional (B, T), non-zero = valid; masked positions give 0 in value and gradient.
        loss, alpha, beta: the divergence and its weight (`sparse_rows`).
        chunk_size: positions per chunk; None = all at once.

    Returns:
        (B, T) fp32, 0 at masked positions.
    """
    if student_logits.dim() != 3 or teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher ids {tuple(teacher_ids.shape)} "
                         "must be (B, T, V) and (B, T, k)")
    if teacher_logprobs.shape != teacher_ids.shape or teacher_tail.shape != teacher_ids.shape[:2]:
        raise ValueError(f"teacher log-probs {tuple(teacher_logprobs.shape)} / tail {tuple(teacher_tail.shape)} "
                         f"do not match the ids {tuple(teacher_ids.shape)}")
    rows = sparse_rows(loss, alpha=alpha, beta=beta)
    valid = valid_mask(mask, student_logits)  # (B, T)

    def per_chunk(s: Tensor, ids: Tensor, lp: Tensor, tail: Tensor, m: Tensor) -> Tensor:
        x = _clean_logits(s, m)  # (B, c, V) fp32
        ids = torch.where(m.unsqueeze(-1), ids, 0).long()  # (B, c, k): masked rows may hold anything
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (B, c, 1)
        q_top = x.gather(-1, ids) - lse  # (B, c, k)
        q_tail = torch.logsumexp(x.scatter(-1, ids, _NEG_LOGIT), dim=-1, keepdim=True) - lse  # (B, c, 1)
        log_q = torch.cat([q_top, q_tail], dim=-1).clamp_min(_NEG_LOGIT)  # (B, c, k + 1)
        p = torch.cat([lp.float(), tail.float().unsqueeze(-1)], dim=-1).clamp_min(_NEG_LOGIT)  # (B, c, k + 1)
        p = torch.where(m.unsqueeze(-1), p, 0.0)  # garbage at masked rows never reaches the logsumexp
        log_p = p - torch.logsumexp(p, dim=-1, keepdim=True)  # renormalised over the k + 1 outcomes
        return torch.where(m, rows(log_q, log_p), 0.0)  # (B, c)

    return chunked(per_chunk, (student_logits, teacher_ids, teacher_logprobs, teacher_tail, valid), chunk_size)


# ------------------------------------------------------------------- language-model losses
def sft_loss(
    logits: Tensor, labels: Tensor, *, chunk_size: int | None = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy on the labelled tokens (prompt and padding labelled -100).

    HF convention: logits (B, L, V) are those of every input position and labels (B, L) are the
    input ids with -100 where no loss is wanted; position t predicts label t + 1:

        L_SFT = −Σ_{t: y_{t+1} ≠ −100} log q(y_{t+1} | y_≤t)      (sum; the token mean is sum / count)

    Args:
        logits: (B, L, V) student logits.
        labels: (B, L) long, -100 = ignored.
        chunk_size: positions per chunk; None = all at once.

    Returns:
        `(sum, count)`: fp32 scalar sum of the token losses, int64 scalar number of labelled tokens.
    """
    targets = labels[:, 1:]  # (B, L-1)
    valid = targets != -100
    nll = -token_logprobs(logits[:, :-1], targets, valid, chunk_size=chunk_size)  # (B, L-1)
    return nll.sum(), valid.sum()


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, kd_ratio: float = 0.5,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Word-level KD: `(1−k)·L_SFT + k·Σ_t CE(p(·|y_≤t), q(·|y_≤t))` over labelled tokens.

    Same layout as `sft_loss` (HF labels, shifted inside); the KD term uses the teacher at
    temperature 1 at the same positions as the SFT term, so both share one count:

        sum = Σ_{t: y_{t+1} ≠ −100} [ −(1−k)·log q(y_{t+1}|y_≤t) − k·Σ_v p_v log q_v ]

    Args:
        student_logits: (B, L, V) student logits; the gradient flows here.
        teacher_logits: (B, L, V') teacher logits, V' >= V, detached.
        labels: (B, L) long, -100 = ignored.
        kd_ratio: k in [0, 1].
        chunk_size: positions per chunk; None = all at once.

    Returns:
        `(sum, count)`: fp32 scalar, int64 scalar; the loss is `sum / count.clamp_min(1)`.
    """
    _check_weight("kd_ratio", kd_ratio)
    teacher_logits = _check_logits(student_logits, teacher_logits)
    targets = labels[:, 1:]  # (B, L-1)
    valid = targets != -100

    def per_chunk(s: Tensor, t: Tensor, tok: Tensor, m: Tensor) -> Tensor:
        log_q = log_softmax_fp32(s, m)  # (B, c, V)
        nll = -log_q.gather(-1, torch.where(m, tok, 0).unsqueeze(-1)).squeeze(-1)  # (B, c)
        ce = -(log_softmax_fp32(t, m).exp() * log_q).sum(-1)  # (B, c)
        return torch.where(m, (1.0 - kd_ratio) * nll + kd_ratio * ce, 0.0)

    per_token = chunked(per_chunk, (student_logits[:, :-1], teacher_logits[:, :-1], targets, valid), chunk_size)
    return per_token.sum(), valid.sum()


def pt_loss(
    student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None, kd_ratio: float = 0.5, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """MiniLLM's pre-training term `L_pt = (1−k)·CE(student, next token) + k·CE(teacher softmax, student)`.

    With a teacher this is `kd_loss` on the plain-text batch; without one it is the plain LM loss
    (`sft_loss`). Labels follow the HF convention (-100 on padding, shifted inside).

    Args:
        student_logits: (B, L, V) student logits.
        labels: (B, L) long, -100 = ignored.
        teacher_logits: optional (B, L, V') teacher logits, V' >= V.
        kd_ratio: k in [0, 1] (ignored without a teacher).
        chunk_size: positions per chunk; None = all at once.

    Returns:
        `(sum, count)`: fp32 scalar, int64 scalar; the loss is `sum / count.clamp_min(1)`.
    """
    if teacher_logits is None:
        return sft_loss(student_logits, labels, chunk_size=chunk_size)
    return kd_loss(student_logits, teacher_logits, labels, kd_ratio=kd_ratio, chunk_size=chunk_size)
