"""Divergences, language-modelling losses, advantages and the policy loss: pure functions.

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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_NEG_LOGIT = -1e30
"""Finite stand-in for -inf logits: exp() of it is exactly 0 in fp32, differences of two stay finite."""

DEFAULT_CHUNK = 128
"""Default number of positions per chunk (the recipe's `train.chunk_size` default)."""


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


def _valid(mask: Tensor | None, like: Tensor) -> Tensor:
    """(B, T) bool validity mask; all positions valid when `mask` is None."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if mask.shape != like.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(like.shape[:2])}")
    return mask != 0


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


def _clean_logits(logits: Tensor, valid: Tensor) -> Tensor:
    """fp32 copy of a chunk of logits: masked rows set to 0 (any garbage, NaN included), -inf raised to -1e30.

    Args:
        logits: (B, c, V) any float dtype.
        valid: (B, c) bool.
    """
    return logits.float().masked_fill(~valid.unsqueeze(-1), 0.0).clamp_min(_NEG_LOGIT)  # (B, c, V)


def _log_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """fp32 log-softmax over V of `_clean_logits` (finite everywhere; masked rows are uniform)."""
    return torch.log_softmax(_clean_logits(logits, valid), dim=-1)


def _chunked(fn: Callable[..., Tensor], tensors: Sequence[Tensor], chunk_size: int | None) -> Tensor:
    """Apply `fn` to chunks of `tensors` along dim 1 and concatenate its (B, c) results along dim 1.

    Each chunk runs under non-reentrant activation checkpointing when a gradient is needed: autograd
    keeps only the chunk's inputs (views of the full tensors) and recomputes the fp32 (B, c, V)
    intermediates during the backward pass, one chunk at a time.
    """
    if chunk_size is None or tensors[0].shape[1] == 0:
        return fn(*tensors)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    outs = []
    for parts in zip(*(t.split(chunk_size, dim=1) for t in tensors)):
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            outs.append(checkpoint(fn, *parts, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(fn(*parts))
    return torch.cat(outs, dim=1)


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) over the last dim: (B, c, V) log-probs -> (B, c).

    Terms with a_v = 0 are 0 in value and gradient because log-probs are finite (see `_log_softmax`).
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b), the mixture formed in probability space via logaddexp (a logsumexp of two)."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


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
    valid = _valid(mask, student_logits)  # (B, T)

    def per_chunk(s: Tensor, t: Tensor, m: Tensor) -> Tensor:
        log_q, log_p = _log_softmax(s, m), _log_softmax(t, m)  # (B, c, V) fp32 each
        return torch.where(m, rows(log_q, log_p), 0.0)  # (B, c)

    return _chunked(per_chunk, (student_logits, teacher_logits, valid), chunk_size)


# ------------------------------------------------------------------------------ log-probs
def token_logprobs(
    logits: Tensor, tokens: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = DEFAULT_CHUNK
) -> Tensor:
    """Log-probability of each token under the softmax of its logits, in fp32.

    `out[b, t] = logits[b, t, tokens[b, t]] − logsumexp_v logits[b, t, v]`, computed chunk by chunk
    along T so that no full (B, T, V) fp32 copy exists (also not in the backward pass).

    Args:
        logits: (B, T, V) logits aligned with `tokens` (already shifted: position t predicts tokens[:, t]).
        tokens: (B, T) ids; any value (e.g. -100) is allowed at masked positions.
        mask: optional (B, T), non-zero = valid; masked positions give exactly 0.
        chunk_size: positions per chunk; None = all at once without checkpointing.

    Returns:
        (B, T) fp32 log-probs (a -inf logit at the token gives about -1e30, not -inf).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} must be (B, T, V) and (B, T)")
    valid = _valid(mask, logits)  # (B, T)

    def per_chunk(x: Tensor, tok: Tensor, m: Tensor) -> Tensor:
        x = _clean_logits(x, m)  # (B, c, V) fp32
        tok = torch.where(m, tok, 0).unsqueeze(-1)  # (B, c, 1), any id is fine where masked
        logp = x.gather(-1, tok).squeeze(-1) - torch.logsumexp(x, dim=-1)  # (B, c)
        return torch.where(m, logp, 0.0)

    return _chunked(per_chunk, (logits, tokens, valid), chunk_size)


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
    return _divergence(lambda log_q, log_p: _kl_rows(log_p, log_q), student_logits, teacher_logits, mask, chunk_size)


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
        return _divergence(lambda log_q, log_p: _kl_rows(log_q, log_p), student_logits, teacher_logits, mask,
                           chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    teacher_logits = _check_logits(student_logits, teacher_logits)
    valid = _valid(mask, student_logits)  # (B, T)
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
        log_q, log_p = _log_softmax(s, m), _log_softmax(t, m)  # (B, c, V) fp32 each
        kl = torch.where(m, _kl_rows(log_q, log_p), 0.0)  # (B, c)
        ctx.save_for_backward(s, t, m, kl)
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        s, t, m, kl = ctx.saved_tensors
        log_q = _log_softmax(s, m)  # (B, c, V)
        weight = torch.where(m, grad_kl, 0.0).unsqueeze(-1)  # (B, c, 1): 0 at masked positions
        grad = log_q.sub(_log_softmax(t, m)).sub_(kl.unsqueeze(-1))  # log q − log p − KL
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

    def rows(log_q: Tensor, log_p: Tensor) -> Tensor:
        log_m = _log_mix(log_p, log_q, beta)  # (B, c, V) log(β·p + (1−β)·q)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return _divergence(rows, student_logits, teacher_logits, mask, chunk_size)


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
    return _divergence(lambda log_q, log_p: _kl_rows(log_p, _log_mix(log_p, log_q, alpha)),
                       student_logits, teacher_logits, mask, chunk_size)


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
    return _divergence(lambda log_q, log_p: _kl_rows(log_q, _log_mix(log_q, log_p, alpha)),
                       student_logits, teacher_logits, mask, chunk_size)


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Total variation distance per token: `TVD(p, q) = ½ Σ_v |p_v − q_v|`, in [0, 1].

    Args and returns as `forward_kl`.
    """
    return _divergence(lambda log_q, log_p: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1),
                       student_logits, teacher_logits, mask, chunk_size)


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


# ------------------------------------------------------------------------------ reductions
def sum_and_count(values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum of `values` over valid positions and the number of valid positions.

    Dividing the sums of all micro-batches (and ranks) by the count of the GLOBAL batch gives a loss,
    and a gradient, that do not depend on how the batch was split.

    Args:
        values: (B, T) per-token values.
        mask: optional (B, T), non-zero = valid.

    Returns:
        `(sum, count)`: fp32 scalar and int64 scalar.
    """
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask != 0
    return torch.where(valid, values.float(), 0.0).sum(), valid.sum()


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Token mean over valid positions: `Σ_t m_t v_t / max(Σ_t m_t, 1)` (0 when nothing is valid).

    Args:
        values: (B, T) per-token values (anything, even NaN, at masked positions).
        mask: optional (B, T), non-zero = valid.

    Returns:
        fp32 scalar.
    """
    total, count = sum_and_count(values, mask)
    return total / count.clamp_min(1)


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
        log_q = _log_softmax(s, m)  # (B, c, V)
        nll = -log_q.gather(-1, torch.where(m, tok, 0).unsqueeze(-1)).squeeze(-1)  # (B, c)
        ce = -(_log_softmax(t, m).exp() * log_q).sum(-1)  # (B, c)
        return torch.where(m, (1.0 - kd_ratio) * nll + kd_ratio * ce, 0.0)

    per_token = _chunked(per_chunk, (student_logits[:, :-1], teacher_logits[:, :-1], targets, valid), chunk_size)
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


# -------------------------------------------------------------------- MiniLLM policy gradient
def advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.95,
    include_current: bool = True,
    length_norm: bool = True,
    whiten: bool = True,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-token advantages of MiniLLM (algorithm.md §3), detached, fp32.

    Positions are counted within the valid response only: a masked position neither contributes a
    reward nor consumes a discount step (so left or right padding, or an early EOS, never leaks).
    Let `k(t, t')` be the number of valid positions in [t, t') and `n_t` the number of valid
    positions from t on (incl. t). Then

        include_current=True:   G_t = Σ_{t' ≥ t valid} γ^k(t,t') r_t',   Â_t = G_t / max(n_t, 1)
        include_current=False:  G_t = Σ_{t' > t valid} γ^k(t,t') r_t',   Â_t = G_t / max(n_t − 1, 1)

    i.e. with `include_current=False` the next valid token is discounted by γ (G_t = γ·G^incl_{t+1}),
    and length normalisation divides by the number of rewards actually summed (the future tokens,
    n_t − 1), so Â_t is the mean of the future rewards; at the last token G_t = 0 and Â_t = 0.
    Without `length_norm`, Â_t = G_t. With `whiten`:

        A_t = (Â_t − mean) / sqrt(var + 1e-8),   mean/var (population) over all valid tokens

    where the statistics are sums [Σ Â, Σ Â², count] passed through `reduce_fn` (an all-reduce-sum
    over data-parallel ranks; identity by default) in one call, in fp64 so E[Â²] − mean² is accurate.

    Args:
        rewards: (B, T) per-token rewards r_t (e.g. log p − log q_old); values at masked positions are ignored.
        mask: (B, T), non-zero = valid response token.
        gamma: discount γ.
        include_current: whether r_t is part of G_t.
        length_norm: divide by the number of summed rewards.
        whiten: normalise to zero mean and unit variance over valid tokens.
        reduce_fn: sums a small tensor over ranks; None = single process.

    Returns:
        (B, T) fp32 advantages, 0 at masked positions, no gradient.
    """
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    valid = mask != 0  # (B, T)
    r = torch.where(valid, rewards.detach().float(), 0.0)  # (B, T) padded rewards are zeroed
    returns = torch.zeros_like(r)  # (B, T) G_t including the current reward
    running = r.new_zeros(r.shape[0])  # (B,)
    for t in reversed(range(r.shape[1])):
        # valid: G_t = r_t + γ·G_next; masked: pass G_next through unchanged (no reward, no discount step)
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        returns[:, t] = running
    remaining = valid.flip(-1).cumsum(-1).flip(-1)  # (B, T) n_t: valid positions from t on, incl. t
    if include_current:
        adv, count = returns, remaining
    else:
        adv, count = returns - r, remaining - 1  # G_t = G^incl_t − r_t = γ·G^incl_{next valid}
    if length_norm:
        adv = adv / count.clamp_min(1)
    adv = torch.where(valid, adv, 0.0)
    if whiten:
        x = adv.double()
        stats = torch.stack([x.sum(), x.square().sum(), valid.sum().double()])  # masked x are 0
        if reduce_fn is not None:
            stats = reduce_fn(stats)
        n = stats[2].clamp_min(1)
        mean = stats[0] / n
        var = (stats[1] / n - mean.square()).clamp_min(0)
        adv = torch.where(valid, ((x - mean) / torch.sqrt(var + 1e-8)).float(), 0.0)
    return adv


def policy_loss(
    logq_new: Tensor,
    logq_old: Tensor,
    log_w: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO-style clipped policy-gradient loss per token (algorithm.md §4).

        ρ_t = exp(log q_θ(y_t) − log q_old(y_t)) · w_t          (= q_θ / p̃ with w_t = q_old / p̃)
        loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))         (clip_eps None: loss_t = −A_t·ρ_t)

    Only `logq_new` carries a gradient (`logq_old`, `log_w` and `adv` are detached); when ρ is not
    clipped, ∇loss_t = −A_t·ρ_t·∇log q_θ(y_t). The caller reduces with `sum_and_count` /
    global count, i.e. `L_pg = Σ_t m_t loss_t / Σ_t m_t`.

    Args:
        logq_new: (B, T) log q_θ of the sampled tokens under the current student.
        logq_old: (B, T) log q_old at sampling time.
        log_w: (B, T) log importance weight log(q_old / p̃); 0 for pure student sampling.
        adv: (B, T) advantages A_t.
        mask: (B, T), non-zero = valid.
        clip_eps: ε, or None to disable clipping.

    Returns:
        `(loss, clip_fraction)`: (B, T) fp32 per-token loss (0 at masked positions), and the fp32 scalar
        fraction of valid tokens where the clipped term was the larger one (0 without clipping).
    """
    valid = mask != 0  # (B, T)
    log_ratio = logq_new.float() - logq_old.detach().float() + log_w.detach().float()  # (B, T)
    ratio = torch.where(valid, log_ratio, 0.0).exp()  # (B, T), 1 at masked positions
    a = torch.where(valid, adv.detach().float(), 0.0)  # (B, T)
    loss = -a * ratio
    if clip_eps is None:
        clip_frac = loss.new_zeros(())
    else:
        clipped = -a * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        use_clipped = clipped > loss  # (B, T) the pessimistic (clipped) branch wins
        loss = torch.where(use_clipped, clipped, loss)
        clip_frac = masked_mean(use_clipped.float(), valid).detach()
    return torch.where(valid, loss, 0.0), clip_frac
