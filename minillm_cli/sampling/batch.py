"""The batch layout that sampling and training share, and what a rollout records.

Prompts are LEFT-padded (width P), responses RIGHT-padded (width T); response token t sits at column
P + t of `[prompt | response]` and is predicted by the logits at column P + t − 1
(`concat_prompt_response`). `score` teacher-forces a batch in that layout; `Rollout` is what the
samplers (`sampling.rollout.sample`) return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Sampled responses of one batch of prompts plus the per-token quantities recorded at sampling time.

    All (B, T) tensors are 0 where `response_mask` is 0. T is the number of decoding steps actually
    run: `max_new_tokens`, or fewer when every sequence emitted EOS earlier.
    """

    prompt_ids: Tensor
    """(B, P) long, left-padded."""
    prompt_mask: Tensor
    """(B, P) long, 1 = real token."""
    response_ids: Tensor
    """(B, T) long, sampled tokens; `pad_token_id` after the first EOS."""
    response_mask: Tensor
    """(B, T) long, 1 up to AND including the first EOS, 0 after."""
    logq: Tensor
    """(B, T) fp32, log q̃_old(y_t | ·) of the student at sampling time, tempered: log_softmax(z_q / T)."""
    logp: Tensor | None
    """(B, T) fp32, log p(y_t | ·) of the teacher at temperature 1; None when no teacher was given."""
    log_mix: Tensor
    """(B, T) fp32, log-probability with which y_t was drawn: log p̃(y_t) with p̃ the mixture of the
    tempered models, re-normalised over the ids top-k / top-p kept (= logq when α = 0 and no cut)."""
    teacher_logprobs: Tensor | None = None
    """(B, T, V) fp32, the teacher's full next-token log-probs at every response position (over the
    student's ids); only with `keep_teacher_logprobs`. Arbitrary where `response_mask` is 0."""
    teacher_calls: int = 0
    """Teacher forwards run for this batch (prefill included): one per decoding step in lockstep, one
    per draft-and-verify round with `speculative_tokens`."""
    teacher_row_calls: int = 0
    """Σ over rows of the teacher forwards run while that row was still generating: divided by
    `response_mask.sum()`, the teacher calls per generated token (1 in lockstep)."""
    drafts_checked: int = 0
    """Speculative sampling: drafted tokens whose acceptance was decided (up to the first rejection)."""
    drafts_accepted: int = 0
    """Speculative sampling: drafted tokens accepted (rate ≥ 1 − α for the teacher-mixed target)."""


def concat_prompt_response(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Build the teacher-forcing batch `[left-padded prompt | right-padded response]`.

    Response token t sits at column P + t; the logits that predict it are at column P + t − 1.
    Position ids count real tokens only (cumsum of the mask − 1, clamped at 0), so a padded example
    gets the same positions as when it is alone, and the same as during the KV-cached rollout.

    Args:
        prompt_ids: (B, P) left-padded prompt ids.
        prompt_mask: (B, P) 1 for real prompt tokens.
        response_ids: (B, T) response ids (anything after the first EOS is ignored).
        response_mask: (B, T) 1 for response tokens up to and including the first EOS.

    Returns:
        `(input_ids, attention_mask, position_ids)`, each (B, P + T) long.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()  # (B, P+T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
    return input_ids, attention_mask, position_ids


def score(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    vocab_size: int | None = None,
) -> Tensor:
    """Teacher-force prompt + response in one forward; return the log-prob of each response token.

    Only the logits of the last T + 1 columns are built (`logits_to_keep`), never (B, P, V). Runs
    with whatever grad mode the caller is in (wrap in `torch.no_grad()` for scoring only).

    Args:
        model: a causal LM (Hugging Face `...ForCausalLM`).
        prompt_ids: (B, P) left-padded prompt ids.
        prompt_mask: (B, P) 1 for real prompt tokens.
        response_ids: (B, T) response ids.
        response_mask: (B, T) 1 for scored response tokens.
        vocab_size: normalise over the first `vocab_size` ids only (a teacher with a wider, padded
            head scored over the student's ids, as in the rollout); None = the model's full width.

    Returns:
        (B, T) fp32 `log model(y_t | x, y_<t)`, 0 where `response_mask` is 0.
    """
    input_ids, attention_mask, position_ids = concat_prompt_response(
        prompt_ids, prompt_mask, response_ids, response_mask
    )
    T = response_ids.shape[1]
    # Keep columns P−1 .. P+T−1; the last one predicts past the response and is dropped.
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False, logits_to_keep=T + 1,
    ).logits[:, :-1]  # (B, T, V)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logprobs = logits.float().log_softmax(-1)  # (B, T, V)
    token_logprobs = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return token_logprobs * response_mask.to(token_logprobs.dtype)
