"""Token-level distribution metrics between a student q and a teacher p (held-out evaluation).

Everything here works on full-vocabulary next-token distributions from a teacher-forced forward of
both models over the same prompt + continuation. Per response position t (a valid token of the
continuation y):

    forward KL   KL(p‖q)_t = sum_v p(v | x, y_<t) · (log p(v | x, y_<t) − log q(v | x, y_<t))
    reverse KL   KL(q‖p)_t = sum_v q(v | x, y_<t) · (log q(v | x, y_<t) − log p(v | x, y_<t))
    agreement    A_t       = 1[argmax_v q(v | x, y_<t) = argmax_v p(v | x, y_<t)]

The two KLs are the training losses' own per-token functions (`losses.forward_kl` /
`losses.reverse_kl`: fp32 inside, chunked along T, a wider teacher head sliced to the student's
width and re-normalised over the shared ids), so an evaluated KL is exactly what a KD method
optimises. Per-token outputs are (B, T) and 0 where `mask` is 0; averaging over valid tokens is the
caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minillm_cli.data import encoding as data_mod
from minillm_cli.data.encoding import Encoded
from minillm_cli.evaluate.generate import Generation, as_encoded, pairs
from minillm_cli.losses.divergences import align_vocab, forward_kl, reverse_kl
from minillm_cli.methods.batching import response_logits
from minillm_cli.sampling.batch import score

DIVERGENCE_ROWS = 8
"""Continuations per forward of both models in `continuation_divergences`: two (rows, T, V) fp32 logit
tensors and their chunked temporaries at a time, whatever the generation batch."""


def teacher_forward(teacher: torch.nn.Module, b: dict[str, Tensor]) -> Tensor:
    """The teacher's (B, T, Vp) response logits of a batch (one place, so that a test can count them)."""
    return response_logits(teacher, b)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token top-1 agreement 1[argmax q = argmax p] (argmax over the student's ids).

    Args:
        student_logits: (B, T, Vq).
        teacher_logits: (B, T, Vp >= Vq).
        mask: (B, T) 1 on valid response positions.

    Returns:
        (B, T) fp32 of 0/1, 0 where `mask` is 0.
    """
    teacher = align_vocab(student_logits, teacher_logits)
    same = (student_logits.argmax(-1) == teacher.argmax(-1)).float()  # (B, T)
    return same * mask.float()


@torch.no_grad()
def divergences(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 16,
    teacher_logits: Tensor | None = None,
    eos: Sequence[int] = (),
) -> dict[str, Tensor]:
    """Forward KL, reverse KL and top-1 agreement of one batch of continuations (and, with `eos`, each
    model's probability of ending the response at every position: `q_eos`, `p_eos`).

    Args:
        student, teacher: Causal LMs sharing a vocabulary (teacher head may be wider).
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        response_ids, response_mask: (B, T) continuations (whoever sampled them).
        chunk_size: Response positions per fp32 KL computation; bounds the (B, chunk, V)
            temporaries (a 50k vocabulary makes full (B, T, V) fp32 tensors large).
        teacher_logits: (B, T, Vp) the teacher's response logits of this very batch, when the
            caller already has them (the teacher forward is then skipped; `teacher` is unused).

    Returns:
        {"fkl", "rkl", "agree"}: each (B, T) fp32 on the inputs' device, 0 where the mask is 0.
    """
    b = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
         "response_mask": response_mask}
    q_logits = response_logits(student, b)  # (B, T, Vq)
    p_logits = teacher_logits if teacher_logits is not None else teacher_forward(teacher, b)  # (B, T, Vp)
    p_logits = p_logits.to(q_logits.device)
    mask = response_mask.to(q_logits.device)
    out = {
        "fkl": forward_kl(q_logits, p_logits, mask, chunk_size=chunk_size),
        "rkl": reverse_kl(q_logits, p_logits, mask, chunk_size=chunk_size),
        "agree": top1_agreement(q_logits, p_logits, mask),
    }
    if eos:
        ids = torch.tensor(list(eos), device=q_logits.device)
        p_aligned = align_vocab(q_logits, p_logits)  # the teacher over the student's ids, as the KLs see it
        for key, logits in (("q_eos", q_logits), ("p_eos", p_aligned)):
            z = logits.float()
            # P(EOS) = Σ_eos exp(z_eos − logsumexp z), without a (B, T, V) softmax
            out[key] = (z[..., ids].logsumexp(-1) - z.logsumexp(-1)).exp() * mask  # (B, T)
    return out


@dataclass
class Divergences:
    """Per-token divergences of N continuations, padded to a common width L (numpy, fp32)."""

    fkl: np.ndarray
    """(N, L) forward KL(p‖q) per response position."""
    rkl: np.ndarray
    """(N, L) reverse KL(q‖p)."""
    agree: np.ndarray
    """(N, L) top-1 agreement (0/1)."""
    mask: np.ndarray
    """(N, L) 1 on valid response positions."""
    q_eos: np.ndarray | None = None
    """(N, L) the student's probability of ending the response there (with `eos`)."""
    p_eos: np.ndarray | None = None
    """(N, L) the teacher's."""

    def token_mean(self, name: str) -> float:
        """Mean of `fkl`, `rkl` or `agree` over all valid response tokens (NaN if there are none)."""
        n = self.mask.sum()
        return float(getattr(self, name).sum() / n) if n else float("nan")

    def per_row(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(N,) sums of `fkl`, `rkl` or `agree` over each row's valid tokens and (N,) their counts:
        `token_mean` is sums.sum() / counts.sum() (the parts a paired comparison resamples)."""
        return (getattr(self, name) * self.mask).sum(-1).astype(np.float64), self.mask.sum(-1).astype(np.float64)


@torch.no_grad()
def continuation_divergences(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    generations: Sequence[Generation],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    width: int,
    teacher_cache: dict[int, torch.Tensor] | None = None,
    eos: Sequence[int] = (),
) -> Divergences:
    """KL(p‖q), KL(q‖p) and top-1 agreement at every position of some continuations.

    Both models are teacher-forced over prompt + continuation (whoever sampled it); the formulas are
    in `divergences` above. Row i belongs to `generations[i]`. With `teacher_cache` (one dict per list of
    generations, shared by every student scored on them), the teacher's logits of each batch are
    kept there on first use, keyed by the batch's first row, and reused: the batches are the same
    rows for every student, so the numbers are those of a fresh forward.

    Args:
        student, teacher: Causal LMs sharing a vocabulary, on `device`.
        generations: The continuations.
        pad_id: Padding id.
        batch_size: Continuations per forward.
        device: Where the models live.
        width: L, the padded width (at least the longest continuation, e.g. max_new_tokens).

    Returns:
        `Divergences` with (N, width) arrays.
    """
    n = len(generations)
    batch_size = min(batch_size, DIVERGENCE_ROWS)
    fkl, rkl, agree, mask, q_eos, p_eos = (np.zeros((n, width), dtype=np.float32) for _ in range(6))
    items = as_encoded(generations)
    for start in range(0, n, batch_size):
        b = pairs(items[start : start + batch_size], pad_id, device)
        if not bool(b["response_mask"].any()):
            continue  # only empty continuations: nothing to score
        cached = teacher_cache.get(start) if teacher_cache is not None else None
        if teacher_cache is not None and cached is None:
            cached = teacher_cache[start] = teacher_forward(teacher, b)  # (b, T, Vp)
        d = divergences(student, teacher, b["prompt_ids"], b["prompt_mask"], b["response_ids"],
                        b["response_mask"], teacher_logits=cached, eos=eos)
        rows, t = slice(start, start + b["response_ids"].shape[0]), b["response_ids"].shape[1]
        fkl[rows, :t] = d["fkl"].cpu().numpy()
        rkl[rows, :t] = d["rkl"].cpu().numpy()
        agree[rows, :t] = d["agree"].cpu().numpy()
        mask[rows, :t] = b["response_mask"].cpu().numpy()
        if eos:
            q_eos[rows, :t] = d["q_eos"].cpu().numpy()
            p_eos[rows, :t] = d["p_eos"].cpu().numpy()
    return Divergences(fkl=fkl, rkl=rkl, agree=agree, mask=mask, q_eos=q_eos if eos else None,
                       p_eos=p_eos if eos else None)


@torch.no_grad()
def label_probabilities(
    model: torch.nn.Module,
    prompts: Sequence[Encoded],
    label_token_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Next-token probabilities of the label tokens after each prompt, softmax restricted to them.

        P(label k | x) = exp(z_k) / sum_j exp(z_j),  z = the logits of the first token after x,
                                                    k and j running over the label tokens only

    Args:
        model: A causal LM.
        prompts: Rendered, cut prompts.
        label_token_ids: The first token id of each label word (distinct).
        pad_id: Padding id.
        batch_size: Prompts per forward.
        device: Where the model lives.

    Returns:
        (N, K) fp32 probabilities, rows summing to 1.
    """
    was_training = model.training
    model.eval()
    labels = torch.tensor(list(label_token_ids), dtype=torch.long, device=device)
    rows: list[np.ndarray] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = data_mod.collate_prompts(list(prompts[start : start + batch_size]), pad_id)  # (B, P)
            ids, mask = ids.to(device), mask.to(device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # real-token positions under left padding
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                           logits_to_keep=1).logits[:, -1]  # (B, V)
            probs = logits.float()[:, labels].softmax(-1)  # (B, K)
            rows.append(probs.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------- across tokenizers (text level)
@torch.no_grad()
def own_logprobs(model: torch.nn.Module, generations: Sequence[Generation], *, pad_id: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """(N,) log-probability of each generation's own tokens (EOS included when it stopped) under the
    model that sampled them, after its prompt."""
    items = as_encoded(generations)
    out = np.zeros(len(items), dtype=np.float64)
    for start in range(0, len(items), batch_size):
        b = pairs(items[start : start + batch_size], pad_id, device)
        token_logp = score(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])  # (b, T)
        out[start : start + token_logp.shape[0]] = token_logp.sum(-1).double().cpu().numpy()
    return out


@torch.no_grad()
def text_logprobs(model: torch.nn.Module, tokenizer: Any, prompts: dict[int, list[int]],
                  texts: Sequence[tuple[int, str, bool]], *, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The log-probability of texts under a model of another tokenizer: each `(index, text, finished)`
    tokenised with `tokenizer` (+ its EOS when finished), after that model's own prompt `prompts[index]`.

    Returns:
        (N,) log-probs and (N,) bool: False where the text does not survive the tokenizer's round trip
        (`retokenize` rules; its value is then 0 and it is left out of the means).
    """
    from minillm_cli.data import retokenize

    values = np.zeros(len(texts), dtype=np.float64)
    ok = np.zeros(len(texts), dtype=bool)
    todo = []
    for i, (index, text, finished) in enumerate(texts):
        tokens = retokenize.scoring_tokens(tokenizer, text, finished)
        if tokens.problem is None and tokens.ids:
            ok[i] = True
            todo.append((i, Encoded(prompt_ids=prompts[index], response_ids=tokens.ids, index=index)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        b = data_mod.collate_pairs([e for _, e in chunk], pad)
        b = {k: v.to(device) for k, v in b.items()}
        token_logp = score(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
        for row, (i, _) in enumerate(chunk):
            values[i] = float(token_logp[row].sum())
    return values, ok


def generation_texts(tokenizer: Any, generations: Sequence[Generation], eos: Sequence[int]) -> list[tuple[int, str, bool]]:
    """`(index, text, finished)` of each generation: its tokens before EOS decoded as `retokenize` does
    (a text that is not valid UTF-8 is scored by no one: the other model gets U+FFFD, which fails)."""
    from minillm_cli.data import retokenize

    out = []
    for g in generations:
        finished = bool(g.response_ids) and g.response_ids[-1] in eos
        out.append((g.index, retokenize.response_text(tokenizer, g.response_ids, finished).text, finished))
    return out
