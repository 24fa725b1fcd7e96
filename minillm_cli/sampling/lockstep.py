"""Lockstep decoding of p̃: one token per step, one student forward (and one teacher forward) per step.

Both models keep their own KV cache and are fed the same sampled tokens; rows that emitted EOS are
dropped from the caches (where the caches allow it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from minillm_cli.sampling.batch import Rollout
from minillm_cli.sampling.cached_lm import CachedLM
from minillm_cli.sampling.mixture import Settings, draw, teacher_view, temper


def lockstep(q_lm: CachedLM, p_lm: CachedLM | None, prompt_ids: Tensor, prompt_mask: Tensor,
              s: Settings) -> Rollout:
    """One token per step: each step one student forward (and one teacher forward) per active row.

    Rows that emitted EOS are dropped from the KV caches (where the caches allow it), so that later
    steps compute only the rows still generating; `idx` (A,) maps the active rows to batch rows.
    """
    device = prompt_ids.device
    B, P = prompt_ids.shape
    M = s.max_new_tokens
    # The full mask is allocated once; each forward gets a view of its first columns. Columns of
    # finished rows that are kept stay 1: their outputs are discarded anyway.
    attention_mask = torch.ones(B, P + M, dtype=torch.long, device=device)
    attention_mask[:, :P] = prompt_mask
    n_prompt = prompt_mask.sum(-1)  # (B,) real prompt tokens = position of the first response token

    response_ids = torch.full((B, M), s.pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(B, M, dtype=torch.long, device=device)
    logq_out = torch.zeros(B, M, dtype=torch.float32, device=device)
    logp_out = torch.zeros_like(logq_out) if p_lm is not None else None
    teacher_out: Tensor | None = None  # (B, M, V), allocated at the first step
    log_mix_out = torch.zeros_like(logq_out)
    idx = torch.arange(B, device=device)  # (A,) batch row of each active row
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (A,)
    compact: bool | None = None  # decided after the prefill, when the caches exist

    # Prefill: one forward over the whole prompt per model.
    input_ids = prompt_ids
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    steps = 0
    teacher_row_calls = 0
    for t in range(M):
        # Prefill sees the P prompt columns; the decode step feeding token t−1 sees P + t.
        mask_t = attention_mask[:, : P + t]  # (A, P+t): past + current tokens
        logq = q_lm.step(input_ids, mask_t, position_ids)  # (A, V)
        vocab = logq.shape[-1]
        logp = teacher_view(p_lm.step(input_ids, mask_t, position_ids), vocab) if p_lm is not None else None
        if compact is None:
            compact = q_lm.can_drop_rows() and (p_lm is None or p_lm.can_drop_rows())

        # The sampled models: tempered student q̃ and tempered teacher share (= the models at T = 1).
        logq_t = temper(logq, s.temperature)  # (A, V) log q̃
        log_mix = s.target(logq_t, logp)  # (A, V) what is really sampled, −inf = cut
        token = draw(log_mix.exp(), s.generator, (B, idx))  # (A,) the stream of the whole batch
        token = token.masked_fill(finished, s.pad_token_id)
        alive = ~finished  # (A,) rows that still produce response tokens at step t
        rows = torch.arange(idx.numel(), device=device)
        teacher_row_calls += int(alive.sum()) if p_lm is not None else 0

        response_ids[idx, t] = token
        response_mask[idx, t] = alive.long()
        # `where`, not a product: a masked −inf must become 0, not NaN.
        logq_out[idx, t] = torch.where(alive, logq_t[rows, token], 0.0)
        if logp_out is not None and logp is not None:
            logp_out[idx, t] = torch.where(alive, logp[rows, token], 0.0)
        if s.keep_teacher_logprobs and logp is not None:
            if teacher_out is None:
                teacher_out = logp.new_zeros(B, M, vocab)
            teacher_out[idx, t] = logp
        log_mix_out[idx, t] = torch.where(alive, log_mix[rows, token], 0.0)
        steps = t + 1

        finished = finished | torch.isin(token, s.eos)
        if bool(finished.all()):
            break
        input_ids = token.unsqueeze(-1)  # (A, 1)
        position_ids = (n_prompt + t).unsqueeze(-1)  # (A, 1): real tokens before this one
        if compact and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)  # (A',)
            q_lm.keep_rows(keep)
            if p_lm is not None:
                p_lm.keep_rows(keep)
            idx, finished, input_ids, position_ids = idx[keep], finished[keep], input_ids[keep], position_ids[keep]
            attention_mask, n_prompt = attention_mask[keep], n_prompt[keep]

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids[:, :steps],
        response_mask=response_mask[:, :steps],
        logq=logq_out[:, :steps],
        logp=logp_out[:, :steps] if logp_out is not None else None,
        log_mix=log_mix_out[:, :steps],
        teacher_logprobs=teacher_out[:, :steps] if teacher_out is not None else None,
        teacher_calls=steps if p_lm is not None else 0,
        teacher_row_calls=teacher_row_calls,
    )
