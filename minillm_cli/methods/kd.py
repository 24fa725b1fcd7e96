"""Word-level KD: `(1-k)·SFT + k·D(teacher, student)` per response token of the dataset's responses.

D is forward KL by default (the classic KD baseline; its gradient equals that of the cross-entropy
to the teacher's softmax at temperature 1); reverse KL, skew KL / skew reverse KL (DistiLLM), TVD and
generalized JSD can be chosen with `method.loss`. Token mean over the global batch, like SFT.

With `data.teacher_cache` no teacher is loaded: D is computed from the cached top-k log-probs
(`sparse.sparse_divergence`: the top-k ids plus one tail bucket), read for each micro-batch.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from minillm_cli.config.methods import KdMethod
from minillm_cli.data.encoding import Encoded
from minillm_cli.losses import divergences, sparse
from minillm_cli.losses import logprobs as logprobs_mod
from minillm_cli.methods.batching import micro_batches, response_logits
from minillm_cli.methods.context import Ctx, check_stop


def divergence(cfg: KdMethod, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               chunk_size: int) -> torch.Tensor:
    """Per-token divergence chosen by `cfg.loss`: (B, T) fp32, 0 where mask is 0."""
    kw: dict[str, Any] = {"chunk_size": chunk_size}
    if cfg.loss == "forward_kl":
        return divergences.forward_kl(student_logits, teacher_logits, mask, **kw)
    if cfg.loss == "reverse_kl":
        return divergences.reverse_kl(student_logits, teacher_logits, mask, **kw)
    if cfg.loss == "skew_forward_kl":
        return divergences.skew_forward_kl(student_logits, teacher_logits, mask, alpha=cfg.skew_alpha, **kw)
    if cfg.loss == "skew_reverse_kl":
        return divergences.skew_reverse_kl(student_logits, teacher_logits, mask, alpha=cfg.skew_alpha, **kw)
    if cfg.loss == "tvd":
        return divergences.tvd(student_logits, teacher_logits, mask, **kw)
    return divergences.generalized_jsd(student_logits, teacher_logits, mask, beta=cfg.jsd_beta, **kw)


def teacher_divergence(ctx: Ctx, cfg: KdMethod, student_logits: torch.Tensor, b: dict[str, torch.Tensor],
                       examples: list[Encoded]) -> torch.Tensor:
    """Per-token divergence (B, T) of one micro-batch to the teacher: the live teacher's full softmax,
    or the cached top-k (`ctx.teacher_cache`) of the micro-batch's `examples`."""
    mask, chunk = b["response_mask"], ctx.recipe.train.chunk_size
    if ctx.teacher_cache is not None:
        ids, logprobs, tail = ctx.teacher_cache.batch(examples, mask.shape[1], ctx.device)  # (B, T, K) x2, (B, T)
        return sparse.sparse_divergence(student_logits, ids, logprobs, tail, mask, loss=cfg.loss,
                                        alpha=cfg.skew_alpha, beta=cfg.jsd_beta, chunk_size=chunk)
    assert ctx.teacher is not None  # guaranteed by prepare.resolve_models for teacher methods
    with torch.no_grad():
        t_logits = response_logits(ctx.teacher, b, vocab=student_logits.shape[-1])  # (B, T, V) sliced to shared ids
    return divergence(cfg, student_logits, t_logits, mask, chunk)


class KdStepper:
    """One optimizer step of word-level KD over `batch_size × grad_accum` examples per rank."""

    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        assert isinstance(ctx.recipe.method, KdMethod)
        self.ctx = ctx
        self.cfg = ctx.recipe.method

    def step(self) -> dict[str, float]:
        ctx, tr, k = self.ctx, self.ctx.recipe.train, self.cfg.kd_ratio
        t0 = time.time()
        examples = ctx.next_examples(tr.batch_size * tr.grad_accum)
        batches, mean = micro_batches(ctx, examples)
        sums = {"sft": torch.zeros((), device=ctx.device), "kd": torch.zeros((), device=ctx.device)}
        for i, b in enumerate(batches):
            check_stop(ctx)
            mask = b["response_mask"]
            logits = response_logits(ctx.student, b)  # (B, T, V)
            nll = -logprobs_mod.token_logprobs(logits, b["response_ids"], chunk_size=tr.chunk_size)  # (B, T)
            rows = examples[i * tr.batch_size : (i + 1) * tr.batch_size]  # micro-batch i, as micro_batches cuts it
            div = teacher_divergence(ctx, self.cfg, logits, b, rows)  # (B, T)
            sft_sum, kd_sum = (nll * mask).sum(), (div * mask).sum()
            mean.backward((1 - k) * sft_sum + k * kd_sum, last=i == len(batches) - 1)
            sums["sft"] += sft_sum.detach()
            sums["kd"] += kd_sum.detach()
        sft_loss, kd_loss = mean.value(sums["sft"]), mean.value(sums["kd"])
        tokens = mean.tokens
        return {"loss": (1 - k) * sft_loss + k * kd_loss, "sft_loss": sft_loss, "kd_loss": kd_loss,
                "tokens": tokens, "tok_per_s": tokens / max(time.time() - t0, 1e-9)}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass
