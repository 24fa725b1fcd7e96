"""The teacher's side of a cross-tokenizer MiniLLM buffer (`models.cross_tokenizer`, docs/algorithm.md §7).

For every rollout: the student's response becomes text, the teacher tokenizes that text with its own
tokenizer after the example's prompt in its own template, one teacher-forced forward gives the
log-probability of each teacher token (the teacher's EOS too when the response finished), and
`data.retokenize.assign` hands each of them to the student token that covers its last character.
The result replaces the same-tokenizer `log p` of the sampled tokens, so that the per-token reward
log p − log q_old sums, per sequence, to log p_teacher(text | prompt) − log q(response | prompt), and
the policy gradient, length normalisation, whitening and PPO clipping run unchanged.

Rows whose text does not survive the round trip (`retokenize`'s rules) get no teacher score and are
dropped from the buffer's losses (their response mask is zeroed), and counted (`xtok_mismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from minillm_cli.data import retokenize
from minillm_cli.methods.context import Ctx
from minillm_cli.models.loading import eos_ids


@dataclass
class TextScores:
    logp: torch.Tensor
    """(N, T) the teacher's log-probs handed to each student token (0 on dropped rows and padding)."""
    dropped: torch.Tensor
    """(N,) bool: rows whose text does not survive the round trip."""
    problems: list[str] = field(default_factory=list)
    """Why, for each dropped row (one example is quoted when the run stops)."""


@torch.no_grad()
def score_text(ctx: Ctx, buf: dict[str, torch.Tensor], rows_per_forward: int) -> TextScores:
    """Teacher log-probs of the buffer's responses as text, per student token (module docstring).

    `buf` holds the rollouts (`response_ids`, `response_mask`, and `index`: the training example of
    each row, whose teacher-side prompt is `ctx.teacher_prompts[index]`)."""
    from minillm_cli.sampling.batch import score

    assert ctx.teacher is not None and ctx.teacher_tokenizer is not None and ctx.teacher_prompts is not None
    s_tok, t_tok = ctx.tokenizer, ctx.teacher_tokenizer
    eos = set(eos_ids(ctx.accelerator.unwrap_model(ctx.student), s_tok))  # what ended a rollout
    N, T = buf["response_ids"].shape
    logp = torch.zeros(N, T, dtype=torch.float32, device=ctx.device)
    dropped = torch.zeros(N, dtype=torch.bool, device=ctx.device)
    problems: list[str] = []
    items: list[tuple[int, retokenize.ResponseText, retokenize.ScoringTokens, bool]] = []
    for i in range(N):
        n = int(buf["response_mask"][i].sum())
        ids = buf["response_ids"][i, :n].tolist()
        finished = n > 0 and ids[-1] in eos
        student = retokenize.response_text(s_tok, ids, finished)
        teacher = retokenize.scoring_tokens(t_tok, student.text, finished)
        problem = student.problem or teacher.problem
        if problem is not None:
            dropped[i] = True
            problems.append(problem)
            continue
        items.append((i, student, teacher, finished))
    pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
    for start in range(0, len(items), rows_per_forward):
        chunk = items[start : start + rows_per_forward]
        prompts = [ctx.teacher_prompts[int(buf["index"][i])] for i, *_ in chunk]
        prompt_ids, prompt_mask = _left_pad(prompts, pad, ctx.device)
        response_ids, response_mask = _right_pad([t.ids for _, _, t, _ in chunk], pad, ctx.device)
        token_logp = score(ctx.teacher, prompt_ids, prompt_mask, response_ids, response_mask)  # (b, U)
        for row, (i, student, teacher, finished) in enumerate(chunk):
            values = retokenize.assign(student.ends, teacher.ends, token_logp[row, : len(teacher.ids)].tolist(),
                                       finished)
            logp[i, : len(values)] = torch.tensor(values, dtype=torch.float32, device=ctx.device)
    return TextScores(logp=logp, dropped=dropped, problems=problems)


def _left_pad(seqs: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, device=device)
            mask[r, width - len(s):] = 1
    return ids, mask


def _right_pad(seqs: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=1) or 1
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        if s:
            ids[r, : len(s)] = torch.tensor(s, device=device)
            mask[r, : len(s)] = 1
    return ids, mask
