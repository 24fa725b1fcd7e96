"""Batched, KV-cached sampling from the teacher-mixed distribution p̃ = α·p_teacher + (1−α)·q_student.

This is our own decoding loop (no `model.generate`): one prefill forward over the left-padded
prompts per model, then one token per step, each model keeping its own KV cache (`cached_lm.CachedLM`)
and both fed the same sampled tokens (`_lockstep`). With a teacher in the mixture and
`speculative_tokens` k > 0 the same distribution is sampled speculatively instead (`_speculative`):
the student drafts k tokens, the teacher checks them in one forward. Both loops drop finished rows
from the caches, so that later forwards compute only the rows still generating.

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


def _filter(log_mix: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k, then top-p, applied to (..., V) mixture log-probs; returns the re-normalised (..., V)
    log-probs actually sampled from (removed ids get −inf). The most likely id always survives,
    so every row keeps mass."""
    logits = log_mix  # (..., V)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop an id when the ids strictly more likely than it already reach top_p.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., V)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def _temper(logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(z / T) from (..., V) log-probs log_softmax(z) (the same thing: the shift cancels)."""
    return logprobs if temperature == 1.0 else (logprobs / temperature).log_softmax(-1)


def _teacher_view(logp: Tensor, vocab: int) -> Tensor:
    """(..., Vp) teacher log-probs over the student's first `vocab` ids: a wider (padded) head is
    sliced and renormalised over the shared ids; a narrower one is an error."""
    if logp.shape[-1] < vocab:
        raise ValueError(f"teacher output width {logp.shape[-1]} is narrower than the student's {vocab}")
    return logp[..., :vocab].log_softmax(-1) if logp.shape[-1] > vocab else logp


def _target(logq_t: Tensor, logp: Tensor | None, alpha: float, temperature: float, top_k: int,
            top_p: float) -> Tensor:
    """log of the distribution tokens are drawn from, (..., V): p̃ = (1−α)·q̃ + α·softmax(z_p / T)
    from the tempered student log-probs `logq_t` and the teacher's `logp`, cut by top-k / top-p."""
    if alpha == 0.0:
        log_mix = logq_t
    elif logp is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs the teacher")
    elif alpha == 1.0:
        log_mix = _temper(logp, temperature)
    else:
        # log p̃ = log((1−α)·q̃ + α·p_T), in log space so that tiny probabilities stay exact.
        log_mix = torch.logaddexp(logq_t + math.log1p(-alpha), _temper(logp, temperature) + math.log(alpha))
    if top_k != 0 or top_p != 1.0:
        log_mix = _filter(log_mix, top_k, top_p)  # what is really sampled, −inf = cut
    return log_mix


def _draw(probs: Tensor, generator: torch.Generator | None, rows_of: tuple[int, Tensor] | None = None) -> Tensor:
    """One id per row of (A, V) non-negative weights, by inverse transform sampling.

    One uniform per row against the fp64 cumulative sum (`torch.multinomial` draws V random numbers
    per row instead, ~8 ms for 8 × 49k ids on CPU: a sizeable share of a decode step). Ids of weight 0
    are never drawn; fp64 keeps every positive fp32 weight a positive step of the sum.
    `rows_of = (B, idx)`: the A rows are rows `idx` of a batch of B; B uniforms are drawn and row
    idx[i] uses the idx[i]-th, so dropping finished rows leaves the other rows' draws unchanged.
    """
    cdf = probs.double().cumsum(-1)  # (A, V)
    n = probs.shape[0] if rows_of is None else rows_of[0]
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device, generator=generator)  # (B, 1)
    if rows_of is not None:
        u = u[rows_of[1]]  # (A, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (A, 1): first id with cdf > u·total
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
    speculative_tokens: int = 0,
) -> Rollout:
    """Sample responses for a batch of left-padded prompts from p̃ = α·p_teacher + (1−α)·q_student.

    The mixture is formed in probability space in fp32 over the student's ids (a wider teacher head
    is sliced to them), from the TEMPERED models (see the module docstring), and top-k / top-p cut
    the mixture; `log_mix` is the log-probability of the drawn token under exactly that distribution.
    With α = 0 the teacher is not needed to sample; if one is given anyway its log-probs are still
    recorded (the MiniLLM reward needs them), from the same single forward per step. The student
    (and teacher) run in eval mode (dropout off); their previous modes are restored afterwards.
    Decoding stops once every sequence has emitted EOS; finished sequences are fed pad tokens that
    are masked out of every recorded quantity.

    With `speculative_tokens` k > 0 and α > 0 the same distribution is sampled by speculative
    sampling (`_speculative`): the student drafts k tokens, the teacher scores them in one forward,
    and each draft is accepted with probability min(1, p̃/q̃). The sequences are distributed
    exactly as in lockstep decoding (not the same draws: the random stream is used differently),
    and every recorded quantity is the same function of the tokens.

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
        speculative_tokens: drafted tokens per teacher forward (0 = lockstep: one teacher forward
            per token). Used only when α > 0 (with α = 0 the student alone is sampled).

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
    if speculative_tokens < 0:
        raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")

    # A round never needs more drafts than tokens are left after the first one (the first is drawn at
    # the prefill): more would be drafted, verified and cached only to be cut.
    speculative_tokens = min(speculative_tokens, max(max_new_tokens - 1, 1))
    device = prompt_ids.device
    prompt_mask = prompt_mask.to(device=device, dtype=torch.long)
    settings = _Settings(alpha, max_new_tokens, _eos_tensor(eos_token_id, device), pad_token_id, temperature,
                         top_k, top_p, generator, keep_teacher_logprobs)
    models = [student] if teacher is None else [student, teacher]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        # Room for every new column of a lockstep rollout; speculative rounds also cache their
        # rejected drafts (holes), so they may outgrow it once (the buffers double).
        spare = max_new_tokens + (speculative_tokens if alpha > 0.0 else 0)
        q_lm = CachedLM(student, device, spare_columns=spare)
        p_lm = CachedLM(teacher, device, spare_columns=spare) if teacher is not None else None
        if p_lm is not None and alpha > 0.0 and speculative_tokens > 0:
            return _speculative(q_lm, p_lm, prompt_ids, prompt_mask, settings, speculative_tokens)
        return _lockstep(q_lm, p_lm, prompt_ids, prompt_mask, settings)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)


@dataclass
class _Settings:
    """`sample`'s validated sampler settings, passed to the two decoding loops."""

    alpha: float
    max_new_tokens: int
    eos: Tensor
    """(E,) ids that end a response."""
    pad_token_id: int
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    keep_teacher_logprobs: bool

    def target(self, logq_t: Tensor, logp: Tensor | None) -> Tensor:
        return _target(logq_t, logp, self.alpha, self.temperature, self.top_k, self.top_p)


def _lockstep(q_lm: CachedLM, p_lm: CachedLM | None, prompt_ids: Tensor, prompt_mask: Tensor,
              s: _Settings) -> Rollout:
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
        logp = _teacher_view(p_lm.step(input_ids, mask_t, position_ids), vocab) if p_lm is not None else None
        if compact is None:
            compact = q_lm.can_drop_rows() and (p_lm is None or p_lm.can_drop_rows())

        # The sampled models: tempered student q̃ and tempered teacher share (= the models at T = 1).
        logq_t = _temper(logq, s.temperature)  # (A, V) log q̃
        log_mix = s.target(logq_t, logp)  # (A, V) what is really sampled, −inf = cut
        token = _draw(log_mix.exp(), s.generator, (B, idx))  # (A,) the stream of the whole batch
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


def _speculative(q_lm: CachedLM, p_lm: CachedLM, prompt_ids: Tensor, prompt_mask: Tensor, s: _Settings,
                 k: int) -> Rollout:
    """Speculative sampling of the target p̃ (Leviathan et al. 2023, Chen et al. 2023) with the
    student as the draft model.

    After the prefill (both models, first token drawn from p̃ as in lockstep), each round
      1. the student drafts d_1..d_k from q̃ (k one-token forwards: the pending token, d_1, .., d_{k−1});
      2. the teacher runs ONE forward over the same k tokens: p at the k drafted positions;
      3. per row, d_j is accepted with probability min(1, p̃_j(d_j) / q̃_j(d_j)) until the first
         rejection, where a token is drawn from the normalised max(0, p̃_j − q̃_j) instead (for the
         uncut mixture that is α·max(0, p_T − q̃): the acceptance rate is 1 − α·TV ≥ 1 − α).
    A row emits its accepted drafts plus the replacement (1 to k tokens per round), so rows advance
    at their own pace. Both KV caches receive the same k columns per round; the columns of a row's
    rejected drafts stay in the caches as holes that the attention mask hides from then on, and
    position ids count real tokens only, so every later forward sees exactly the accepted prefix.

    Tensor shapes: B rows, V student ids, k drafts per round, M = max_new_tokens.
    """
    device = prompt_ids.device
    B, P = prompt_ids.shape
    M, gen = s.max_new_tokens, s.generator
    rows = torch.arange(B, device=device)
    response_ids = torch.full((B, M), s.pad_token_id, dtype=torch.long, device=device)
    logq_out = torch.zeros(B, M, dtype=torch.float32, device=device)
    logp_out = torch.zeros_like(logq_out)
    log_mix_out = torch.zeros_like(logq_out)
    teacher_out: Tensor | None = None  # (B, M, V)

    # Prefill, and the first token from p̃ exactly as the lockstep sampler draws it.
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    logq_t = _temper(q_lm.step(prompt_ids, prompt_mask, position_ids), s.temperature)  # (B, V)
    vocab = logq_t.shape[-1]
    logp = _teacher_view(p_lm.step(prompt_ids, prompt_mask, position_ids), vocab)  # (B, V)
    log_mix = s.target(logq_t, logp)
    token = _draw(log_mix.exp(), gen)  # (B,)
    response_ids[:, 0] = token
    logq_out[:, 0], logp_out[:, 0], log_mix_out[:, 0] = logq_t[rows, token], logp[rows, token], log_mix[rows, token]
    if s.keep_teacher_logprobs:
        teacher_out = logp.new_zeros(B, M, vocab)
        teacher_out[:, 0] = logp

    lengths = torch.ones(B, dtype=torch.long, device=device)  # (B,) tokens emitted per row
    # The round loop works on the ACTIVE rows only: `idx` (A,) maps them to batch rows. Rows that
    # finish are dropped from both KV caches, so later forwards do not compute them (where a cache
    # cannot drop rows they stay, marked finished, and emit nothing).
    idx = torch.arange(B, device=device)
    finished = torch.isin(token, s.eos) | torch.tensor(M == 1, device=device)  # (A,)
    pending = token  # (A,) the newest emitted token, not yet in either cache
    pos = prompt_mask.sum(-1)  # (A,) its position id: real tokens before it
    mask = prompt_mask  # (A, C) attention mask of the cached columns (0 = padding or a rejected draft)
    compact = q_lm.can_drop_rows() and p_lm.can_drop_rows()
    teacher_calls, row_calls, checked, accepted = 1, B, 0, 0
    while not bool(finished.all()):
        if compact and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)  # (A',)
            q_lm.keep_rows(keep)
            p_lm.keep_rows(keep)
            idx, finished, pending, pos, mask = idx[keep], finished[keep], pending[keep], pos[keep], mask[keep]
        A = idx.numel()
        rows = torch.arange(A, device=device)
        n_out = lengths[idx]  # (A,)
        alive = ~finished
        kr = min(k, int((M - n_out)[alive].max()))  # no row can use more this round
        ar = torch.arange(kr, device=device)

        # 1. Draft kr tokens from the tempered student; feed all but the last.
        fed, drafts, draft_logq = [], [], []
        current = pending
        for j in range(kr):
            step_mask = torch.cat([mask, mask.new_ones(A, j + 1)], dim=1)  # (A, C + j + 1)
            lq = _temper(q_lm.step(current.unsqueeze(-1), step_mask, (pos + j).unsqueeze(-1)), s.temperature)
            fed.append(current)
            current = _draw(lq.exp(), gen)  # (A,) d_{j+1}
            drafts.append(current)
            draft_logq.append(lq)
        inputs = torch.stack(fed, dim=1)  # (A, kr): pending, d_1 .. d_{kr−1}
        d = torch.stack(drafts, dim=1)  # (A, kr): d_1 .. d_kr
        lq_all = torch.stack(draft_logq, dim=1)  # (A, kr, V) log q̃ at the drafted positions

        # 2. The teacher over the same kr columns, one forward.
        round_mask = torch.cat([mask, mask.new_ones(A, kr)], dim=1)  # (A, C + kr)
        lp_all = _teacher_view(p_lm.step_all(inputs, round_mask, pos.unsqueeze(-1) + ar), vocab)  # (A, kr, V)
        lt_all = s.target(lq_all, lp_all)  # (A, kr, V) log p̃
        teacher_calls += 1
        row_calls += int(alive.sum())

        # 3. Accept while u < p̃(d)/q̃(d) (in fp64: the ratio is ≥ 1 − α, never tiny for the mixture).
        ratio = (lt_all.gather(-1, d.unsqueeze(-1)) - lq_all.gather(-1, d.unsqueeze(-1))).squeeze(-1).double().exp()
        u = torch.rand(A, kr, dtype=torch.float64, device=device, generator=gen)
        n_acc = (u < ratio).long().cumprod(dim=-1).sum(dim=-1)  # (A,) leading accepted drafts
        rejected = n_acc < kr
        at = n_acc.clamp(max=kr - 1)  # (A,) the rejected position (ignored where all were accepted)
        residual = residual_probs(lt_all[rows, at], lq_all[rows, at])  # (A, V)
        replacement = _draw(residual, gen)  # (A,)
        emitted = d.clone()  # (A, kr): accepted drafts, then the replacement
        emitted[rows, at] = torch.where(rejected, replacement, d[rows, at])
        n_emit = torch.where(rejected, n_acc + 1, kr)  # (A,)
        checked += int(n_emit[alive].sum())
        accepted += int(n_acc[alive].sum())
        # Cut at the first EOS and at the budget; finished rows emit nothing.
        is_eos = torch.isin(emitted, s.eos) & (ar < n_emit.unsqueeze(-1))  # (A, kr)
        through_eos = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, kr)  # (A,)
        n_emit = torch.minimum(torch.minimum(n_emit, through_eos), M - n_out).masked_fill(finished, 0)

        # Record the emitted tokens at their response columns.
        b_idx, j_idx = (ar < n_emit.unsqueeze(-1)).nonzero(as_tuple=True)
        row, col = idx[b_idx], n_out[b_idx] + j_idx
        tok = emitted[b_idx, j_idx]
        response_ids[row, col] = tok
        logq_out[row, col] = lq_all[b_idx, j_idx, tok]
        logp_out[row, col] = lp_all[b_idx, j_idx, tok]
        log_mix_out[row, col] = lt_all[b_idx, j_idx, tok]
        if teacher_out is not None:
            teacher_out[row, col] = lp_all[b_idx, j_idx]

        # The caches hold this round's kr columns: the first n_emit of a row are its accepted prefix
        # (the pending token, then the emitted tokens but the last); the rest become holes.
        mask = torch.cat([mask, (ar < n_emit.unsqueeze(-1)).long()], dim=1)
        last = emitted[rows, (n_emit - 1).clamp(min=0)]
        pending = torch.where(n_emit > 0, last, pending)
        pos = pos + n_emit
        lengths[idx] = n_out + n_emit
        finished = finished | (is_eos & (ar < n_emit.unsqueeze(-1))).any(-1) | (lengths[idx] >= M)

    steps = int(lengths.max())
    response_mask = (torch.arange(M, device=device) < lengths.unsqueeze(-1)).long()  # (B, M)
    response_ids = response_ids.masked_fill(response_mask == 0, s.pad_token_id)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids[:, :steps],
        response_mask=response_mask[:, :steps],
        logq=logq_out[:, :steps],
        logp=logp_out[:, :steps],
        log_mix=log_mix_out[:, :steps],
        teacher_logprobs=teacher_out[:, :steps] if teacher_out is not None else None,
        teacher_calls=teacher_calls,
        teacher_row_calls=row_calls,
        drafts_checked=checked,
        drafts_accepted=accepted,
    )


def residual_probs(log_target: Tensor, log_draft: Tensor) -> Tensor:
    """(B, V) weights of the replacement draw after a rejected draft: max(0, p̃ − q̃), unnormalised
    (`_draw` normalises). A row whose residual is all zero (target = draft to float rounding, so a
    rejection had probability ~0) falls back to the target itself."""
    residual = (log_target.exp() - log_draft.exp()).clamp(min=0.0)  # (B, V)
    empty = residual.sum(-1, keepdim=True) <= 0
    return torch.where(empty, log_target.exp(), residual)
