"""SFT: cross-entropy on response tokens only (prompt and padding masked), EOS trained.

The loss of one optimizer step is the token mean over the whole global batch (all micro-batches of
all ranks, see `batching.TokenMean`), so splitting a batch differently into micro-batches or ranks
gives the same update.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from minillm_cli.losses import logprobs
from minillm_cli.methods.batching import micro_batches, response_logits
from minillm_cli.methods.context import Ctx, check_stop


class SftStepper:
    """One optimizer step of SFT over `batch_size × grad_accum` examples per rank."""

    needs_teacher: ClassVar[bool] = False

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def step(self) -> dict[str, float]:
        ctx, tr = self.ctx, self.ctx.recipe.train
        t0 = time.time()
        batches, mean = micro_batches(ctx, ctx.next_examples(tr.batch_size * tr.grad_accum))
        total = torch.zeros((), device=ctx.device)
        for i, b in enumerate(batches):
            check_stop(ctx)
            logits = response_logits(ctx.student, b)  # (B, T, V)
            nll = -logprobs.token_logprobs(logits, b["response_ids"], chunk_size=tr.chunk_size)  # (B, T)
            loss_sum = (nll * b["response_mask"]).sum()
            mean.backward(loss_sum, last=i == len(batches) - 1)
            total += loss_sum.detach()
        tokens = mean.tokens
        return {"loss": mean.value(total), "tokens": tokens, "tok_per_s": tokens / max(time.time() - t0, 1e-9)}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass
