"""SeqKD: the teacher answers every training prompt once (sampling: T=1, top-k 0, top-p 1 by default,
`rollout.*` to change), the answers are cached with the run, and the student is fine-tuned on the
TEACHER's text with plain SFT. (The reference code silently trained on the gold outputs; we never do,
and the run's meta.json records the cache file and how many responses came from the teacher.)
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from minillm_cli import data as data_mod
from minillm_cli.checkpoint import write_text_atomic
from minillm_cli.config import SeqKdMethod
from minillm_cli.context import Ctx, check_stop
from minillm_cli.methods.sft import SftStepper
from minillm_cli.progress import Phase
from minillm_cli.rundir import SEQKD_CACHE

CACHE_NAME = SEQKD_CACHE


def generate_teacher_responses(ctx: Ctx, cfg: SeqKdMethod) -> list[list[int]]:
    """Sample one teacher response per training prompt (batched, KV-cached; our own sampler)."""
    from minillm_cli.rollout import sample

    assert ctx.teacher is not None
    r = ctx.recipe.rollout
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(ctx.recipe.train.seed + 7919)  # its own stream: the training RNG is not consumed
    out: list[list[int]] = []
    with Phase("seqkd: teacher answers", len(ctx.train), "prompts", ctx.console, ctx.print) as phase:
        for i in range(0, len(ctx.train), cfg.batch_size):
            check_stop(ctx)
            chunk = ctx.train[i : i + cfg.batch_size]
            ids, mask = data_mod.collate_prompts(chunk, ctx.tokenizer.pad_token_id)
            roll = sample(ctx.teacher, ids.to(ctx.device), mask.to(ctx.device), alpha=0.0,
                          max_new_tokens=cfg.max_new_tokens, eos_token_id=ctx.tokenizer.eos_token_id,
                          pad_token_id=ctx.tokenizer.pad_token_id, temperature=r.temperature, top_k=r.top_k,
                          top_p=r.top_p, generator=gen)
            for row in range(len(chunk)):
                n = int(roll.response_mask[row].sum())
                out.append(roll.response_ids[row, :n].tolist())
            phase.advance(len(chunk))
    return out


class SeqKdStepper:
    """Generates (or reloads) the teacher's responses, then runs SFT on them."""

    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        cfg = ctx.recipe.method
        assert isinstance(cfg, SeqKdMethod)
        cache = ctx.run_dir / CACHE_NAME
        if cache.exists():
            responses = [json.loads(line)["response_ids"] for line in cache.read_text().splitlines() if line.strip()]
            if len(responses) != len(ctx.train):
                responses = []
        else:
            responses = []
        if not responses:
            responses = generate_teacher_responses(ctx, cfg)
            if ctx.accelerator.is_main_process:
                lines = [json.dumps({"index": e.index, "response_ids": resp,
                                     "response": ctx.tokenizer.decode(resp, skip_special_tokens=True)})
                         for e, resp in zip(ctx.train, responses)]
                write_text_atomic(cache, "\n".join(lines) + "\n")
        ctx.train = [data_mod.Encoded(prompt_ids=e.prompt_ids, response_ids=resp, index=e.index)
                     for e, resp in zip(ctx.train, responses)]
        ctx.extra_meta["seqkd"] = {"responses": str(cache), "count": len(responses), "source": "teacher"}
        self.sft = SftStepper(ctx)

    def step(self) -> dict[str, float]:
        return self.sft.step()

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass
