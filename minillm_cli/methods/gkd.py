"""On-policy token-level distillation (GKD, Agarwal et al. 2024).

Per micro-batch, with probability `lmbda` the responses are sampled from the current student (our
KV-cached sampler, `rollout.*` settings), otherwise the dataset's responses are used; the loss is the
generalized JSD(beta) between teacher and student next-token distributions at every response token
(beta = 0 forward KL, beta = 1 reverse KL), token mean over the global batch. No gradient flows
through the sampling.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from minillm_cli.config.methods import GkdMethod
from minillm_cli.data import encoding as data_mod
from minillm_cli.methods.batching import (
    jsd_backward,
)
from minillm_cli.methods.context import Ctx, check_stop
from minillm_cli.models.loading import eos_ids


class GkdStepper:
    """One optimizer step of GKD over `batch_size × grad_accum` prompts per rank."""

    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        assert ctx.teacher is not None  # guaranteed by prepare.resolve_models for teacher methods
        assert isinstance(ctx.recipe.method, GkdMethod)
        self.ctx = ctx
        self.teacher = ctx.teacher
        self.cfg = ctx.recipe.method

    def _on_policy(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from minillm_cli.sampling.rollout import sample

        ctx, r = self.ctx, self.ctx.recipe.rollout
        student = ctx.accelerator.unwrap_model(ctx.student)
        roll = sample(student, b["prompt_ids"], b["prompt_mask"], alpha=0.0,
                      max_new_tokens=self.cfg.max_new_tokens, eos_token_id=eos_ids(student, ctx.tokenizer),
                      pad_token_id=ctx.tokenizer.pad_token_id, temperature=r.temperature, top_k=r.top_k,
                      top_p=r.top_p, generator=ctx.gen)
        return {**b, "response_ids": roll.response_ids, "response_mask": roll.response_mask}

    def step(self) -> dict[str, float]:
        ctx, tr = self.ctx, self.ctx.recipe.train
        t0 = time.time()
        examples = ctx.next_examples(tr.batch_size * tr.grad_accum)
        batches = []
        on_policy = 0
        for i in range(0, len(examples), tr.batch_size):
            check_stop(ctx)
            b = {k: v.to(ctx.device) for k, v in data_mod.collate_pairs(examples[i : i + tr.batch_size],
                                                                          ctx.tokenizer.pad_token_id).items()}
            coin = torch.rand((), generator=ctx.gen, device=ctx.device)
            if float(coin) < self.cfg.lmbda:
                b = self._on_policy(b)
                on_policy += 1
            batches.append(b)
        mean, total = jsd_backward(ctx, self.teacher, batches, self.cfg.beta)
        tokens = mean.tokens
        return {"loss": mean.value(total), "on_policy_frac": on_policy / len(batches),
                "resp_len": tokens / max(len(examples) * ctx.world, 1), "tokens": tokens,
                "tok_per_s": tokens / max(time.time() - t0, 1e-9)}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass
