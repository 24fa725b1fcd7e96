"""A teacher reduced to its top-k ids plus one tail bucket (what a teacher cache stores), and the
divergences between such a teacher and the full student (conventions: `divergences`' docstring).

`teacher_top_k` makes the reduction; `sparse_divergence` computes any `method.loss` between the two
distributions coarse-grained to K + 1 outcomes (docs/algorithm.md §5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from minillm_cli.losses.divergences import (
    check_weight,
    forward_kl_rows,
    jsd_rows,
    reverse_kl_rows,
    skew_forward_rows,
    skew_reverse_rows,
    tvd_rows,
)
from minillm_cli.losses.logprobs import DEFAULT_CHUNK, NEG_LOGIT, chunked, clean_logits, log_softmax_fp32, valid_mask


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
        tail = torch.logsumexp(log_p.scatter(-1, top.indices, NEG_LOGIT), dim=-1)  # (B, c)
        ids.append(torch.where(m.unsqueeze(-1), top.indices, 0))
        logps.append(torch.where(m.unsqueeze(-1), top.values, NEG_LOGIT))
        tails.append(torch.where(m, tail.clamp_min(NEG_LOGIT), 0.0))
    return torch.cat(ids, dim=1), torch.cat(logps, dim=1), torch.cat(tails, dim=1)


def sparse_rows(loss: str, *, alpha: float = 0.1, beta: float = 0.5) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-position divergence `rows(log_q, log_p)` of `method.loss` (names as in config.KdMethod).

    Every divergence here is a sum over outcomes, so it applies unchanged to the coarse (k + 1)-outcome
    distributions of `sparse_divergence`.
    """
    if loss in ("skew_forward_kl", "skew_reverse_kl"):
        check_weight("alpha", alpha)
    if loss == "jsd":
        check_weight("beta", beta)
    table: dict[str, Callable[[], Callable[[Tensor, Tensor], Tensor]]] = {
        "forward_kl": lambda: forward_kl_rows,
        "reverse_kl": lambda: reverse_kl_rows,
        "skew_forward_kl": lambda: skew_forward_rows(alpha),
        "skew_reverse_kl": lambda: skew_reverse_rows(alpha),
        "tvd": lambda: tvd_rows,
        "jsd": lambda: forward_kl_rows if beta == 0.0 else reverse_kl_rows if beta == 1.0 else jsd_rows(beta),
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
        x = clean_logits(s, m)  # (B, c, V) fp32
        ids = torch.where(m.unsqueeze(-1), ids, 0).long()  # (B, c, k): masked rows may hold anything
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (B, c, 1)
        q_top = x.gather(-1, ids) - lse  # (B, c, k)
        q_tail = torch.logsumexp(x.scatter(-1, ids, NEG_LOGIT), dim=-1, keepdim=True) - lse  # (B, c, 1)
        log_q = torch.cat([q_top, q_tail], dim=-1).clamp_min(NEG_LOGIT)  # (B, c, k + 1)
        p = torch.cat([lp.float(), tail.float().unsqueeze(-1)], dim=-1).clamp_min(NEG_LOGIT)  # (B, c, k + 1)
        p = torch.where(m.unsqueeze(-1), p, 0.0)  # garbage at masked rows never reaches the logsumexp
        log_p = p - torch.logsumexp(p, dim=-1, keepdim=True)  # renormalised over the k + 1 outcomes
        return torch.where(m, rows(log_q, log_p), 0.0)  # (B, c)

    return chunked(per_chunk, (student_logits, teacher_ids, teacher_logprobs, teacher_tail, valid), chunk_size)


