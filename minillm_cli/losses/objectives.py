"""Sequence losses on labelled tokens: SFT, word-level KD and MiniLLM's pre-training term. Each returns
`(sum, count)` so that the caller divides by the global batch's token count (conventions:
`divergences`' docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from minillm_cli.losses.divergences import check_logits, check_weight
from minillm_cli.losses.logprobs import DEFAULT_CHUNK, chunked, log_softmax_fp32, token_logprobs


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
    check_weight("kd_ratio", kd_ratio)
    teacher_logits = check_logits(student_logits, teacher_logits)
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
