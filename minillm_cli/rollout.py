"""Batched, KV-cached sampling from the teacher-mixed distribution p̃ = α·p_teacher + (1−α)·q_student.

This is our own decoding loop (no `model.generate`): one prefill forward over the left-padded
prompts per model, then one token per step, each model keeping its own KV cache (`cached_lm.CachedLM`)
and both fed the same sampled tokens.

Sampling and recording use ONE distribution. With temperature T, every sampled model's logits are
divided by T before its softmax (as in the MiniLLM reference code): the student becomes
q̃ = softmax(z_q / T), the teacher's share of the mixture softmax(z_p / T), and tokens are drawn from

    p̃ = (1−α)·q̃ + α·softmax(z_p / T),   then top-k / top-p applied to p̃ and re-normalised.

Per sampled token we record

    logq_t    = log q̃_old(y_t | x, y_<t)      the student as sampled (tempered; = log q_old at T = 1)
    logp_t    = log p(y_t | x, y_<t)          the teacher itself (temperature 1, sliced to the student's ids)
    log_mix_t = log of the probability y_t was actually drawn with (p̃ after the top-k / top-p cut)

so that `w_t = exp(logq_t − log_mix_t)` is exactly the importance weight of the drawn token.
At the defaults (T = 1, top-k 0, top-p 1) these are the untempered model log-probs and
`log_mix_t = log((1−α)·exp(logq_t) + α·exp(logp_t))`. With top-k / top-p, `logq_t` is the
student's probability BEFORE the cut, so an objective defined on q̃ cannot be estimated from such
samples (ids outside the kept set are never drawn): MiniLLM rejects those settings.

Batch layout shared with the training step (see `concat_prompt_response`): the prompt is LEFT-padded
(width P), the response RIGHT-padded (width T); response token t sits at column P + t of the
concatenation and is predicted by the logits at column P + t − 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minillm_cli.cached_lm import CachedLM


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


def _filter(log_mix: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k, then top-p, applied to (B, V) mixture log-probs; returns the re-normalised (B, V)
    log-probs actually sampled from (removed ids get −inf). The most likely id always survives,
    so every row keeps mass."""
    logits = log_mix  # (B, V)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop an id when the ids strictly more likely than it already reach top_p.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def _temper(logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(z / T) from (B, V) log-probs log_softmax(z) (the same thing: the shift cancels)."""
    return logprobs if temperature == 1.0 else (logprobs / temperature).log_softmax(-1)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One id per row of (B, V) non-negative weights, by inverse transform sampling.

    One uniform per row against the fp64 cumulative sum (`torch.multinomial` draws V random numbers
    per row instead, ~8 ms for 8 × 49k ids on CPU: a sizeable share of a decode step). Ids of weight 0
    are never drawn; fp64 keeps every positive fp32 weight a positive step of the sum.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1): first id with cdf > u·total
    return token.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _eos_tensor(eos_token_id: int | Sequence[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def sample(
    student: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    teacher: torch.nn.Module | None = None,
    alpha: float = 0.0,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    keep_teacher_logprobs: bool = False,
) -> Rollout:
    """Sample responses for a batch of left-padded prompts from p̃ = α·p_teacher + (1−α)·q_student.

    The mixture is formed in probability space in fp32 over the student's ids (a wider teacher head
    is sliced to them), from the TEMPERED models (see the module docstring), and top-k / top-p cut
    the mixture; `log_mix` is the log-probability of the drawn token under exactly that distribution. With α = 0 the teacher is not needed to sample; if one is given anyway its
    log-probs are still recorded (the MiniLLM reward needs them), from the same single forward per
    step. The student (and teacher) run in eval mode (dropout off); their previous modes are
    restored afterwards. Decoding stops once every sequence has emitted EOS; finished sequences are
    fed pad tokens that are masked out of every recorded quantity.

    Args:
        student: the sampling policy q_old (a `...ForCausalLM`).
        prompt_ids: (B, P) LEFT-padded prompt ids.
        prompt_mask: (B, P) 1 for real prompt tokens.
        teacher: the frozen teacher p, or None.
        alpha: teacher weight α in [0, 1] of the sampling mixture.
        max_new_tokens: at most this many response tokens per prompt.
        eos_token_id: id (or ids) that end a response.
        pad_token_id: id written (and fed) after a sequence's EOS.
        temperature: > 0; divides the logits of the student (and of the teacher's share) before mixing.
        top_k: keep the k most likely ids of the mixture (0 = off).
        top_p: nucleus mass in (0, 1] (1 = off).
        generator: RNG of every draw, for reproducible and resumable rollouts.
        keep_teacher_logprobs: also return the teacher's full log-probs at every response position
            (B × max_new_tokens × V fp32), which the teacher computes anyway when it is given: a caller
            that needs them (MiniLLM's single-step term) is spared a second teacher forward.

    Returns:
        A `Rollout` with responses of width T ≤ `max_new_tokens`.

    Raises:
        ValueError: on out-of-range settings, α > 0 without a teacher, or a teacher whose output
            head is narrower than the student's.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0.0 and teacher is None:
        raise ValueError(f"alpha={alpha} > 0 needs a teacher")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    device = prompt_ids.device
    B, P = prompt_ids.shape
    prompt_mask = prompt_mask.to(device=device, dtype=torch.long)
    eos = _eos_tensor(eos_token_id, device)
    models = [student] if teacher is None else [student, teacher]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        q_lm = CachedLM(student, device)
        p_lm = CachedLM(teacher, device) if teacher is not None else None

        # The full mask is allocated once; each forward gets a view of its first columns. Columns of
        # finished sequences stay 1: their outputs are discarded anyway.
        attention_mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
        attention_mask[:, :P] = prompt_mask
        n_prompt = prompt_mask.sum(-1)  # (B,) real prompt tokens = position of the first response token

        response_ids = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        response_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        logq_out = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        logp_out = torch.zeros_like(logq_out) if p_lm is not None else None
        teacher_out: Tensor | None = None  # (B, max_new_tokens, V), allocated at the first step
        log_mix_out = torch.zeros_like(logq_out)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)

        # Prefill: one forward over the whole prompt per model.
        input_ids = prompt_ids
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        steps = 0
        for t in range(max_new_tokens):
            # Prefill sees the P prompt columns; the decode step feeding token t−1 sees P + t.
            mask_t = attention_mask[:, : P + t]  # (B, P+t): past + current tokens
            logq = q_lm.step(input_ids, mask_t, position_ids)  # (B, Vq)
            vocab = logq.shape[-1]
            logp = None
            if p_lm is not None:
                logp = p_lm.step(input_ids, mask_t, position_ids)  # (B, Vp)
                if logp.shape[-1] < vocab:
                    raise ValueError(
                        f"teacher output width {logp.shape[-1]} is narrower than the student's {vocab}"
                    )
                if logp.shape[-1] > vocab:
                    # Padding rows of a wider teacher head: renormalise over the shared ids.
                    logp = logp[:, :vocab].log_softmax(-1)

            # The sampled models: tempered student q̃ and tempered teacher share (= the models at T = 1).
            logq_t = _temper(logq, temperature)  # (B, V) log q̃
            # log p̃ = log((1−α)·q̃ + α·p_T), in log space so that tiny probabilities stay exact.
            if alpha == 0.0:
                log_mix = logq_t
            elif logp is None:
                raise ValueError("teacher-mixed sampling (alpha > 0) needs the teacher")
            elif alpha == 1.0:
                log_mix = _temper(logp, temperature)
            else:
                log_mix = torch.logaddexp(logq_t + math.log1p(-alpha),
                                          _temper(logp, temperature) + math.log(alpha))  # (B, V)
            if top_k != 0 or top_p != 1.0:
                log_mix = _filter(log_mix, top_k, top_p)  # (B, V) what is really sampled, −inf = cut
            probs = log_mix.exp()  # (B, V) normalised
            token = _draw(probs, generator)  # (B,)
            token = token.masked_fill(finished, pad_token_id)
            alive = ~finished  # (B,) sequences that still produce response tokens at step t

            response_ids[:, t] = token
            response_mask[:, t] = alive.long()
            # `where`, not a product: a masked −inf must become 0, not NaN.
            logq_out[:, t] = torch.where(alive, logq_t[rows, token], 0.0)
            if logp_out is not None and logp is not None:
                logp_out[:, t] = torch.where(alive, logp[rows, token], 0.0)
            if keep_teacher_logprobs and logp is not None:
                if teacher_out is None:
                    teacher_out = logp.new_empty(B, max_new_tokens, vocab)
                teacher_out[:, t] = logp
            log_mix_out[:, t] = torch.where(alive, log_mix[rows, token], 0.0)
            steps = t + 1

            finished = finished | torch.isin(token, eos)
            if bool(finished.all()):
                break
            input_ids = token.unsqueeze(-1)  # (B, 1)
            position_ids = (n_prompt + t).unsqueeze(-1)  # (B, 1): real tokens before this one
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids[:, :steps],
        response_mask=response_mask[:, :steps],
        logq=logq_out[:, :steps],
        logp=logp_out[:, :steps] if logp_out is not None else None,
        log_mix=log_mix_out[:, :steps],
        teacher_logprobs=teacher_out[:, :steps] if teacher_out is not None else None,
    )
