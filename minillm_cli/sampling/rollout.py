"""Batched, KV-cached sampling from the teacher-mixed distribution p̃ = α·p_teacher + (1−α)·q_student.

This is our own decoding loop (no `model.generate`): one prefill forward over the left-padded
prompts per model, then one token per step, each model keeping its own KV cache (`sampling.cached_lm.CachedLM`)
and both fed the same sampled tokens (`sampling.lockstep`). With a teacher in the mixture and
`speculative_tokens` k > 0 the same distribution is sampled speculatively instead (`sampling.speculative`):
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

from collections.abc import Sequence

import torch
from torch import Tensor

from minillm_cli.sampling.batch import Rollout
from minillm_cli.sampling.cached_lm import CachedLM
from minillm_cli.sampling.lockstep import lockstep
from minillm_cli.sampling.mixture import Settings, eos_tensor
from minillm_cli.sampling.speculative import speculative


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
    sampling (`sampling.speculative`): the student drafts k tokens, the teacher scores them in one forward,
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
    settings = Settings(alpha, max_new_tokens, eos_tensor(eos_token_id, device), pad_token_id, temperature,
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
            return speculative(q_lm, p_lm, prompt_ids, prompt_mask, settings, speculative_tokens)
        return lockstep(q_lm, p_lm, prompt_ids, prompt_mask, settings)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
