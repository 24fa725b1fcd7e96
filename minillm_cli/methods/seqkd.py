"""SeqKD: the teacher answers every training prompt once (sampling: T=1, top-k 0, top-p 1 by default,
`rollout.*` to change), the answers are cached with the run (or read from `data.teacher_cache`, built
once by `minillm teacher-cache --answers` and shared between runs), and the student is fine-tuned on
the TEACHER's text with plain SFT. (The reference code silently trained on the gold outputs; we never do,
and the run's meta.json records the cache file and how many responses came from the teacher.)
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch

from minillm_cli.config.methods import SeqKdMethod
from minillm_cli.config.schema import RolloutConfig
from minillm_cli.data import encoding as data_mod
from minillm_cli.methods.context import Ctx, check_stop
from minillm_cli.methods.sft import SftStepper
from minillm_cli.models.loading import eos_ids
from minillm_cli.progress import Phase
from minillm_cli.runs.checkpoint import write_text_atomic
from minillm_cli.runs.rundir import SEQKD_CACHE

CACHE_NAME = SEQKD_CACHE


def sample_answers(teacher: torch.nn.Module, examples: list[data_mod.Encoded], cfg: SeqKdMethod,
                   rollout: RolloutConfig, tokenizer: Any, device: torch.device, gen: torch.Generator,
                   stop: Callable[[], None], advance: Callable[[int], None]) -> list[list[int]]:
    """Sample one teacher response per prompt of `examples`, in their order (batches of
    `cfg.batch_size`, KV-cached; our own sampler). `stop()` runs before each batch (it may raise to
    abandon the work), `advance(n)` after each batch of n prompts (progress)."""
    from minillm_cli.sampling.rollout import sample

    out: list[list[int]] = []
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i : i + cfg.batch_size]
        stop()
        ids, mask = data_mod.collate_prompts(chunk, tokenizer.pad_token_id)
        roll = sample(teacher, ids.to(device), mask.to(device), alpha=0.0, max_new_tokens=cfg.max_new_tokens,
                      eos_token_id=eos_ids(teacher, tokenizer), pad_token_id=tokenizer.pad_token_id,
                      temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p, generator=gen)
        for row in range(len(chunk)):
            n = int(roll.response_mask[row].sum())
            out.append(roll.response_ids[row, :n].tolist())
        advance(len(chunk))
    return out


def generate_teacher_responses(ctx: Ctx, cfg: SeqKdMethod) -> list[list[int]]:
    """Sample one teacher response per training prompt (`sample_answers`, with progress and stop checks).

    Cross-tokenizer runs (`ctx.teacher_tokenizer`): the teacher answers each prompt in its own template
    and ids, and its answer's text is tokenised for the student (the student's EOS when the teacher
    stopped; an answer cut by method.max_new_tokens gets none)."""
    assert ctx.teacher is not None
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(ctx.recipe.train.seed + 7919)  # its own stream: the training RNG is not consumed
    t_tok = ctx.teacher_tokenizer
    prompts = ctx.train if t_tok is None or ctx.teacher_prompts is None else [
        data_mod.Encoded(prompt_ids=ctx.teacher_prompts[e.index], response_ids=[], index=e.index) for e in ctx.train]
    with Phase("seqkd: teacher answers", len(ctx.train), "prompts", ctx.console, ctx.print) as phase:
        answers = sample_answers(ctx.teacher, prompts, cfg, ctx.recipe.rollout, t_tok or ctx.tokenizer, ctx.device,
                                 gen, stop=lambda: check_stop(ctx), advance=phase.advance)
    if t_tok is None:
        return answers
    out = []
    for ids in answers:
        finished = bool(ids) and ids[-1] in eos_ids(ctx.teacher, t_tok)
        text = t_tok.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
        out.append(ctx.tokenizer(text, add_special_tokens=False)["input_ids"] + ([ctx.tokenizer.eos_token_id]
                                                                                 if finished else []))
    return out


class SeqKdStepper:
    """Generates (or reloads) the teacher's responses, then runs SFT on them."""

    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        cfg = ctx.recipe.method
        assert isinstance(cfg, SeqKdMethod)
        if ctx.teacher_cache is not None:  # answers built once by `teacher-cache --answers`, checked by open_cache
            responses = ctx.teacher_cache.answers(ctx.train)
            self._train_on(responses)
            ctx.extra_meta["seqkd"] = {"responses": str(ctx.teacher_cache.root), "count": len(responses),
                                       "source": "teacher-cache"}
            return
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
        self._train_on(responses)
        ctx.extra_meta["seqkd"] = {"responses": str(cache), "count": len(responses), "source": "teacher"}

    def _train_on(self, responses: list[list[int]]) -> None:
        """Replace the training rows' responses by the teacher's; SFT on them from now on."""
        ctx = self.ctx
        ctx.train = [data_mod.Encoded(prompt_ids=e.prompt_ids, response_ids=resp, index=e.index)
                     for e, resp in zip(ctx.train, responses)]
        self.sft = SftStepper(ctx)

    def step(self) -> dict[str, float]:
        return self.sft.step()

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass
