"""fp32 token log-probabilities and masked reductions: the primitives every loss is built from.

The conventions of `minillm_cli.losses` hold here: fp32 inside whatever the input dtype; `mask` is
(B, T), non-zero = valid, and masked positions give exactly 0 in value and gradient; -inf logits are
raised to a large finite negative number before the softmax; everything that touches the vocabulary
runs in chunks of `chunk_size` positions along T under activation checkpointing (`chunked`), so an
fp32 (B, chunk, V) temporary exists for one chunk at a time; `chunk_size=None` is the unchunked
reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

NEG_LOGIT = -1e30
"""Finite stand-in for -inf logits: exp() of it is exactly 0 in fp32, differences of two stay finite."""

DEFAULT_CHUNK = 128
"""Default number of positions per chunk (the recipe's `train.chunk_size` default)."""


# ----------------------------------------------------------------------------------- helpers
def valid_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """(B, T) bool validity mask; all positions valid when `mask` is None."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if mask.shape != like.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(like.shape[:2])}")
    return mask != 0


def clean_logits(logits: Tensor, valid: Tensor) -> Tensor:
    """fp32 copy of a chunk of logits: masked rows set to 0 (any garbage, NaN included), -inf raised to -1e30.

    Args:
        logits: (B, c, V) any float dtype.
        valid: (B, c) bool.
    """
    return logits.float().masked_fill(~valid.unsqueeze(-1), 0.0).clamp_min(NEG_LOGIT)  # (B, c, V)


def log_softmax_fp32(logits: Tensor, valid: Tensor) -> Tensor:
    """fp32 log-softmax over V of `clean_logits` (finite everywhere; masked rows are uniform)."""
    return torch.log_softmax(clean_logits(logits, valid), dim=-1)


def chunked(fn: Callable[..., Tensor], tensors: Sequence[Tensor], chunk_size: int | None) -> Tensor:
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
    valid = valid_mask(mask, logits)  # (B, T)

    def per_chunk(x: Tensor, tok: Tensor, m: Tensor) -> Tensor:
        x = clean_logits(x, m)  # (B, c, V) fp32
        tok = torch.where(m, tok, 0).unsqueeze(-1)  # (B, c, 1), any id is fine where masked
        logp = x.gather(-1, tok).squeeze(-1) - torch.logsumexp(x, dim=-1)  # (B, c)
        return torch.where(m, logp, 0.0)

    return chunked(per_chunk, (logits, tokens, valid), chunk_size)


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
