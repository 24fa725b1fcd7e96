"""The distribution rollouts are drawn from, and single draws from it.

p̃ = (1−α)·q̃ + α·softmax(z_p / T) from the tempered student q̃ = softmax(z_q / T) and the teacher,
then cut by top-k / top-p (`target`); one id per row by inverse transform sampling (`draw`); the
replacement distribution of speculative sampling after a rejected draft (`residual_probs`); the
sampler's settings shared by both decoding loops (`Settings`). Shapes: (..., V) over the student's ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def filter_top(log_mix: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k, then top-p, applied to (..., V) mixture log-probs; returns the re-normalised (..., V)
    log-probs actually sampled from (removed ids get −inf). The most likely id always survives,
    so every row keeps mass."""
    logits = log_mix  # (..., V)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop an id when the ids strictly more likely than it already reach top_p.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., V)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def temper(logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(z / T) from (..., V) log-probs log_softmax(z) (the same thing: the shift cancels)."""
    return logprobs if temperature == 1.0 else (logprobs / temperature).log_softmax(-1)


def teacher_view(logp: Tensor, vocab: int) -> Tensor:
    """(..., Vp) teacher log-probs over the student's first `vocab` ids: a wider (padded) head is
    sliced and renormalised over the shared ids; a narrower one is an error."""
    if logp.shape[-1] < vocab:
        raise ValueError(f"teacher output width {logp.shape[-1]} is narrower than the student's {vocab}")
    return logp[..., :vocab].log_softmax(-1) if logp.shape[-1] > vocab else logp


def target(logq_t: Tensor, logp: Tensor | None, alpha: float, temperature: float, top_k: int,
            top_p: float) -> Tensor:
    """log of the distribution tokens are drawn from, (..., V): p̃ = (1−α)·q̃ + α·softmax(z_p / T)
    from the tempered student log-probs `logq_t` and the teacher's `logp`, cut by top-k / top-p."""
    if alpha == 0.0:
        log_mix = logq_t
    elif logp is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs the teacher")
    elif alpha == 1.0:
        log_mix = temper(logp, temperature)
    else:
        # log p̃ = log((1−α)·q̃ + α·p_T), in log space so that tiny probabilities stay exact.
        log_mix = torch.logaddexp(logq_t + math.log1p(-alpha), temper(logp, temperature) + math.log(alpha))
    if top_k != 0 or top_p != 1.0:
        log_mix = filter_top(log_mix, top_k, top_p)  # what is really sampled, −inf = cut
    return log_mix


def draw(probs: Tensor, generator: torch.Generator | None, rows_of: tuple[int, Tensor] | None = None) -> Tensor:
    """One id per row of (A, V) non-negative weights, by inverse transform sampling.

    One uniform per row against the fp64 cumulative sum (`torch.multinomial` draws V random numbers
    per row instead, ~8 ms for 8 × 49k ids on CPU: a sizeable share of a decode step). Ids of weight 0
    are never drawn; fp64 keeps every positive fp32 weight a positive step of the sum.
    `rows_of = (B, idx)`: the A rows are rows `idx` of a batch of B; B uniforms are drawn and row
    idx[i] uses the idx[i]-th, so dropping finished rows leaves the other rows' draws unchanged.
    """
    cdf = probs.double().cumsum(-1)  # (A, V)
    n = probs.shape[0] if rows_of is None else rows_of[0]
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device, generator=generator)  # (B, 1)
    if rows_of is not None:
        u = u[rows_of[1]]  # (A, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (A, 1): first id with cdf > u·total
    return token.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def eos_tensor(eos_token_id: int | Sequence[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@dataclass
class Settings:
    """`sample`'s validated sampler settings, passed to the two decoding loops (lockstep, speculative)."""

    alpha: float
    max_new_tokens: int
    eos: Tensor
    """(E,) ids that end a response."""
    pad_token_id: int
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    keep_teacher_logprobs: bool

    def target(self, logq_t: Tensor, logp: Tensor | None) -> Tensor:
        return target(logq_t, logp, self.alpha, self.temperature, self.top_k, self.top_p)


def residual_probs(log_target: Tensor, log_draft: Tensor) -> Tensor:
    """(B, V) weights of the replacement draw after a rejected draft: max(0, p̃ − q̃), unnormalised
    (`draw` normalises). A row whose residual is all zero (target = draft to float rounding, so a
    rejection had probability ~0) falls back to the target itself."""
    residual = (log_target.exp() - log_draft.exp()).clamp(min=0.0)  # (B, V)
    empty = residual.sum(-1, keepdim=True) <= 0
    return torch.where(empty, log_target.exp(), residual)
