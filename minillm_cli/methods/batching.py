"""What the methods share: batches of the prompt/response layout, the logits of their response
tokens, row groups of similar length, and the token mean over the global batch (`TokenMean`).
"""

from __future__ import annotations

from typing import TypeVar

import torch

from minillm_cli.data import encoding as data_mod
from minillm_cli.methods.context import Ctx


class TokenMean:
    """The token mean of one optimizer step over the GLOBAL batch (all micro-batches of all ranks).

    Each micro-batch backpropagates its per-token loss SUM times `world / count`: DDP averages
    gradients over ranks, so the step's gradient is that of `sum / count`, and splitting a batch
    differently into micro-batches or ranks gives the same update. `count` is the number of tokens
    the mean is over, summed over ranks (at least 1) — every rank must construct it at the same point.
    """

    def __init__(self, ctx: Ctx, local_count: torch.Tensor | int) -> None:
        self.ctx = ctx
        self.count = ctx.global_sum(torch.as_tensor(local_count, device=ctx.device)).clamp_min(1)  # () long

    @property
    def tokens(self) -> int:
        return int(self.count)

    def backward(self, loss_sum: torch.Tensor, last: bool, weight: float = 1.0) -> None:
        """Backward `weight · loss_sum / count` of one micro-batch (`last`: the step's last one)."""
        self.ctx.backward(loss_sum * (self.ctx.world * weight / self.count.float()), last=last)

    def value(self, local_sum: torch.Tensor) -> float:
        """The global token mean of a loss whose sum on this rank is `local_sum` (collective)."""
        return float(self.ctx.global_sum(local_sum) / self.count)


def micro_batches(ctx: Ctx, examples: list[data_mod.Encoded]) -> tuple[list[dict[str, torch.Tensor]], TokenMean]:
    """Collate this rank's examples into micro-batches (prompt/response layout, on the device) and
    return them with the token mean over their response tokens in the GLOBAL batch."""
    bs = ctx.recipe.train.batch_size
    batches = []
    count = torch.zeros((), dtype=torch.long)
    for i in range(0, len(examples), bs):
        b = data_mod.collate_pairs(examples[i : i + bs], ctx.tokenizer.pad_token_id)
        count += b["response_mask"].sum()
        batches.append({k: v.to(ctx.device) for k, v in b.items()})
    return batches, TokenMean(ctx, count)


def response_logits(model: torch.nn.Module, b: dict[str, torch.Tensor], vocab: int | None = None) -> torch.Tensor:
    """Teacher-forced logits of every response position: column t predicts response token t.

    One forward over `[left-padded prompt | right-padded response]` (layout of
    `sampling.batch.concat_prompt_response`), keeping only the last T + 1 logit columns.

    Args:
        model: A causal LM.
        b: "prompt_ids", "prompt_mask" (B, P) left-padded; "response_ids", "response_mask" (B, T) right-padded.
        vocab: keep only the first `vocab` ids (a wider teacher head sliced to the student's width).

    Returns:
        (B, T, V) logits in the model's dtype.
    """
    from minillm_cli.sampling.batch import concat_prompt_response

    input_ids, attention_mask, position_ids = concat_prompt_response(
        b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
    T = b["response_ids"].shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1]  # (B, T, V): column P+t-1 predicts response token t
    return logits[..., :vocab] if vocab is not None else logits


GROUP_TOKENS = 512
"""Padded tokens (rows × (prompt + response columns)) per row group of `length_groups`."""


def length_groups(prompt_mask: torch.Tensor, response_mask: torch.Tensor,
                  max_tokens: int = GROUP_TOKENS) -> list[tuple[torch.Tensor, int, int]]:
    """Split a prompt/response batch into row groups of similar length, each with only the padding it needs.

    Rows are sorted by real length (prompt + response tokens) and cut greedily, longest first, into
    groups whose padded size rows × (P_g + T_g) stays within `max_tokens` (a group has at least one
    row). A batch of prompts of very different lengths, left-padded to the longest, spends much of
    its forward and backward compute on padding; processed group by group, the same tokens at the
    same positions give the same per-token values (sums over groups = sums over the batch) with
    little padding, and only one group's activations and logits are alive at a time.

    Args:
        prompt_mask: (B, P) 1 for real prompt tokens (left-padded).
        response_mask: (B, T) 1 for response tokens (right-padded).
        max_tokens: padded-token budget of a group.

    Returns:
        Per group `(rows, P_g, T_g)`: row indices (long), and the group keeps the last P_g prompt
        columns and the first T_g response columns (see `take_group`).
    """
    p_len = prompt_mask.sum(-1).clamp_min(1).tolist()  # (B,) real prompt tokens
    t_len = response_mask.sum(-1).clamp_min(1).tolist()  # (B,) real response tokens
    order = sorted(range(len(p_len)), key=lambda i: p_len[i] + t_len[i], reverse=True)
    groups: list[tuple[torch.Tensor, int, int]] = []
    rows: list[int] = []
    p_max = t_max = 0
    for i in order:
        p_new, t_new = max(p_max, p_len[i]), max(t_max, t_len[i])
        if rows and (len(rows) + 1) * (p_new + t_new) > max_tokens:
            groups.append((torch.tensor(rows, device=prompt_mask.device), p_max, t_max))
            rows, p_new, t_new = [], p_len[i], t_len[i]
        rows.append(i)
        p_max, t_max = p_new, t_new
    groups.append((torch.tensor(rows, device=prompt_mask.device), p_max, t_max))
    return groups


G = TypeVar("G")


def even_passes(ctx: Ctx, groups: list[G]) -> list[tuple[G, bool]]:
    """This rank's forward/backward passes, each with whether it is real: with several processes,
    padded to the busiest rank's count with repeats of the last group, which callers run with weight 0.

    `length_groups` cuts each rank's rows by their own lengths, so ranks can need different numbers
    of passes, and a pass through a wrapped student is collective: under FSDP every forward
    all-gathers and every backward reduce-scatters; under DDP every forward broadcasts the buffers
    and every backward all-reduces (the forward runs outside `no_sync`). A rank that stopped early
    would leave the others waiting forever. A repeated group is real data of real shapes and adds
    exactly 0 to the gradients. One process: the groups unchanged. Collective when world > 1.
    """
    if ctx.world == 1:
        return [(g, True) for g in groups]
    assert groups, "every rank has at least one micro-batch, so at least one group"  # else nothing to repeat
    most = torch.tensor([len(groups)], device=ctx.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return [(g, True) for g in groups] + [(groups[-1], False)] * (int(most) - len(groups))


def take_group(b: dict[str, torch.Tensor], rows: torch.Tensor, p: int, t: int) -> dict[str, torch.Tensor]:
    """Rows `rows` of a prompt/response batch with the last `p` prompt and the first `t` response columns."""
    return {"prompt_ids": b["prompt_ids"][rows, -p:], "prompt_mask": b["prompt_mask"][rows, -p:],
            "response_ids": b["response_ids"][rows, :t], "response_mask": b["response_mask"][rows, :t]}


def jsd_backward(ctx: Ctx, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]], beta: float,
                 weight: float = 1.0) -> tuple[TokenMean, torch.Tensor]:
    """Backward of the token-mean generalized JSD(beta) between teacher and student over the response
    tokens of `batches` (GKD's loss; MiniLLM's `response_weight` term), times `weight`.

    Rows of similar length go through the models together (`length_groups`); the teacher runs under
    no_grad; gradients sync on the last backward only. Returns the `TokenMean` and the summed
    divergence (detached): `mean.value(total)` is the loss to log."""
    from minillm_cli.losses import divergences
    from minillm_cli.methods.context import check_stop

    mean = TokenMean(ctx, sum(b["response_mask"].sum() for b in batches))
    total = torch.zeros((), device=ctx.device)
    groups = even_passes(ctx, [(b, g) for b in batches for g in length_groups(b["prompt_mask"], b["response_mask"])])
    for i, ((b, (rows, p, t)), real) in enumerate(groups):
        check_stop(ctx)
        g = take_group(b, rows, p, t)
        logits = response_logits(ctx.student, g)  # (b, t, V)
        with torch.no_grad():
            t_logits = response_logits(teacher, g, vocab=logits.shape[-1])  # (b, t, V)
        div = divergences.generalized_jsd(logits, t_logits, g["response_mask"], beta=beta,
                                     chunk_size=ctx.recipe.train.chunk_size)  # (b, t)
        loss_sum = (div * g["response_mask"]).sum()
        mean.backward(loss_sum if real else loss_sum * 0.0, last=i == len(groups) - 1, weight=weight)
        if real:
            total += loss_sum.detach()
    return mean, total
