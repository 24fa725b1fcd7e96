"""The model-running half of evaluation: generation, reference loss, divergences, label probabilities.

Generation uses Hugging Face `model.generate` (batched, KV-cached, with `no_repeat_ngram_size`, which
our own sampler in `rollout.py` does not implement) on LEFT-padded prompts. Each seed's pass starts
with `torch.manual_seed(seed)`, so a pass is reproducible given the model, the prompts, the batch
size and the device. A checkpoint's own `generation_config.json` (a hub model may ship, say,
temperature 0.2 or a repetition penalty) is set aside during the pass: the decoding settings are
exactly those of `EvalConfig`.

Prompts longer than `max_prompt_tokens` keep their LAST tokens (the data module's rule: the end of
a rendered prompt holds the question and the assistant header).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillm_cli.config.schema import EvalConfig
from minillm_cli.data import encoding as data_mod
from minillm_cli.data.encoding import Encoded
from minillm_cli.evaluate import metrics
from minillm_cli.models.loading import eos_ids
from minillm_cli.sampling.batch import score


@dataclass
class Generation:
    """One generated response."""

    index: int
    """Index of the example in the evaluated dataset."""
    seed: int | None
    """Seed of the pass (None for greedy decoding)."""
    prompt_ids: list[int]
    """The prompt as the model saw it (after the length cut)."""
    response_ids: list[int]
    """Generated ids up to and including the first EOS (no EOS if the length limit came first)."""
    text: str
    """The decoded response, special tokens and surrounding whitespace removed."""


def cut_prompts(encoded: Sequence[Encoded], max_prompt_tokens: int) -> list[Encoded]:
    """Cut every prompt to its last `max_prompt_tokens` ids (responses untouched)."""
    return [
        Encoded(prompt_ids=e.prompt_ids[-max_prompt_tokens:], response_ids=e.response_ids, index=e.index)
        for e in encoded
    ]


@contextlib.contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:  # an HF causal LM or its peft wrapper
    """Replace the model's generation config by one with only its special-token ids while inside.

    `generate` fills every setting the caller leaves unset from `model.generation_config`; a shipped
    one would otherwise change the protocol behind our back.
    """
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    saved = base.generation_config
    base.generation_config = GenerationConfig(
        bos_token_id=getattr(saved, "bos_token_id", None),
        eos_token_id=getattr(saved, "eos_token_id", None),
        pad_token_id=getattr(saved, "pad_token_id", None),
    )
    try:
        yield
    finally:
        base.generation_config = saved


def _first_eos_cut(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (`generate` pads a finished sequence after it)."""
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[: i + 1]
    return ids


def decode_response(tokenizer: Any, response_ids: Sequence[int], eos: Sequence[int]) -> str:
    """Response text without its final EOS and without special tokens."""
    ids = list(response_ids)
    if ids and ids[-1] in set(eos):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate(
    model: Any,  # an HF causal LM (its `generate`)
    tokenizer: Any,
    encoded: Sequence[Encoded],
    cfg: EvalConfig,
    *,
    seed: int | None,
    device: torch.device,
    do_sample: bool | None = None,
) -> list[Generation]:
    """Generate one response per prompt with the decoding settings of `cfg`.

    Args:
        model: A causal LM (HF or peft-wrapped); put in eval mode for the pass, its mode restored.
        tokenizer: Its tokenizer (pad and EOS ids, decoding).
        encoded: Prompts (already cut to `cfg.max_prompt_tokens`); `response_ids` are ignored.
        cfg: Decoding settings: greedy, temperature, top_k, top_p, no_repeat_ngram_size,
            max_new_tokens, batch_size.
        seed: `torch.manual_seed(seed)` before the pass (None: leave the RNG as it is).
        device: Where the model lives.
        do_sample: Override `not cfg.greedy` (exposure bias always samples).

    Returns:
        One `Generation` per prompt, in the order of `encoded`.
    """
    sample = (not cfg.greedy) if do_sample is None else do_sample
    pad_id = tokenizer.pad_token_id
    stop = eos_ids(model, tokenizer)
    kwargs: dict[str, Any] = dict(
        do_sample=sample, no_repeat_ngram_size=cfg.no_repeat_ngram_size, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop, pad_token_id=pad_id,
    )
    if sample:  # greedy decoding ignores them (and transformers warns when they are passed)
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    try:
        with _plain_generation_config(model):
            for start in range(0, len(encoded), cfg.batch_size):
                batch = list(encoded[start : start + cfg.batch_size])
                ids, mask = data_mod.collate_prompts(batch, pad_id)  # (B, P) left-padded
                seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)  # (B, P+T)
                new = seqs[:, ids.shape[1] :].tolist()  # (B, T) generated part only
                for e, row in zip(batch, new):
                    response = _first_eos_cut(row, set(stop))
                    out.append(Generation(index=e.index, seed=seed if sample else None, prompt_ids=e.prompt_ids,
                                          response_ids=response, text=decode_response(tokenizer, response, stop)))
    finally:
        model.train(was_training)
    return out


def pairs(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`data.collate_pairs` on `device`: prompts (B, P) left-padded, responses (B, T) right-padded."""
    batch = data_mod.collate_pairs(list(items), pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def as_encoded(generations: Sequence[Generation]) -> list[Encoded]:
    """Generations as prompt + response pairs (for teacher-forced scoring)."""
    return [Encoded(prompt_ids=g.prompt_ids, response_ids=g.response_ids, index=g.index) for g in generations]


@torch.no_grad()
def reference_losses(
    model: torch.nn.Module, encoded: Sequence[Encoded], *, pad_id: int, batch_size: int, device: torch.device
) -> tuple[list[int], np.ndarray]:
    """Per-example LM loss on the references (teacher-forced token mean), for `reference_loss` and
    for paired comparisons.

    Args and model handling as `reference_loss`.

    Returns:
        `(index, loss)`: the example indices of the scored examples (those with a response token)
        and their (N,) losses in nats per token.
    """
    was_training = model.training
    model.eval()
    items = [e for e in encoded if e.response_ids]
    per_sample: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            b = pairs(items[start : start + batch_size], pad_id, device)
            logp = score(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])  # (B, T)
            n_tokens = b["response_mask"].sum(-1).clamp(min=1)  # (B,)
            per_sample += (-logp.sum(-1) / n_tokens).tolist()
    finally:
        model.train(was_training)
    return [e.index for e in items], np.asarray(per_sample, dtype=np.float64)


def reference_loss(
    model: torch.nn.Module, encoded: Sequence[Encoded], *, pad_id: int, batch_size: int, device: torch.device
) -> float:
    """LM loss on the references: teacher-forced, per-sample token mean, then mean over samples.

        loss = 1/N sum_i ( −1/|y_i| sum_t log q(y_i,t | x_i, y_i,<t) )

    with y_i the reference response ids (EOS included unless it was cut by the length rule).

    Args:
        model: A causal LM (its mode is restored afterwards).
        encoded: Prompt + reference pairs; examples with an empty response are skipped.
        pad_id: Padding id.
        batch_size: Examples per forward.
        device: Where the model lives.

    Returns:
        The mean loss in nats per token (NaN when no example has a response token).
    """
    _, losses = reference_losses(model, encoded, pad_id=pad_id, batch_size=batch_size, device=device)
    return float(np.mean(losses)) if losses.size else float("nan")


def per_example_scores(
    generations: Sequence[Generation], references: Sequence[Sequence[str]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-example `rougeL` and `em` (×100) of one pass, (N,) each, in the order of `generations`.

    Args:
        generations: The responses of one pass.
        references: Per generation, its acceptable references (aligned with `generations`).
        names: Which of rougeL, em to compute (others are ignored: dist4 is not per example).

    Raises:
        ValueError: If the two lists differ in length or are empty.
    """
    texts = [g.text for g in generations]
    if len(texts) != len(references) or not texts:
        raise ValueError(f"{len(texts)} predictions but {len(references)} references")
    out: dict[str, np.ndarray] = {}
    if "rougeL" in names:
        out["rougeL"] = np.array([metrics.rouge_l(t, r) for t, r in zip(texts, references)], dtype=np.float64)
    if "em" in names:
        out["em"] = np.array([metrics.exact_match(t, r) for t, r in zip(texts, references)], dtype=np.float64)
    return out


def generation_scores(
    generations: Sequence[Generation], references: Sequence[Sequence[str]], names: Sequence[str],
    per_example: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Text metrics of one pass: `rougeL` and `em` (mean over examples, ×100) and `dist4` (×100).

    Args:
        generations: The responses of one pass.
        references: Per generation, its acceptable references (aligned with `generations`).
        names: Which of rougeL, em, dist4 to compute.
        per_example: `per_example_scores` of this pass when already computed (not recomputed).
    """
    out: dict[str, float] = {}
    if "rougeL" in names or "em" in names:
        scores = per_example if per_example is not None else per_example_scores(generations, references, names)
        out.update({name: float(np.mean(scores[name])) for name in ("rougeL", "em") if name in names})
    if "dist4" in names:
        out["dist4"] = metrics.distinct_n([g.text for g in generations], 4)
    return out


def evaluate_during_training(
    model: torch.nn.Module, tokenizer: Any, dev_encoded: Sequence[Encoded], eval_cfg: EvalConfig, device: torch.device
) -> dict[str, float]:
    """Dev-split numbers for the training log: one pass with the first seed of `eval_cfg.seeds`.

    The references are decoded from each example's `response_ids` (final EOS stripped), i.e. the
    dev responses after the data module's length rule: a response cut to fit `max_total_tokens` is
    scored against its cut form. Prompts are cut to `eval_cfg.max_prompt_tokens` (last tokens kept).
    Always computes `dev/rougeL`; `dev/em`, `dev/dist4` and `dev/loss` when listed in
    `eval_cfg.metrics`. Other metrics (teacher or labelled data needed) are left to `minillm eval`.
    The global torch RNG is restored afterwards, so evaluating does not change the training run.

    Args:
        model: The student (HF or peft-wrapped, unwrapped from any accelerator wrapper).
        tokenizer: Its tokenizer.
        dev_encoded: The dev split as encoded for training.
        eval_cfg: The recipe's eval section.
        device: Where the model lives.

    Returns:
        {"dev/rougeL": ..., ...}; empty when there is no dev example.
    """
    if not dev_encoded:
        return {}
    eos = eos_ids(model, tokenizer)
    prompts = cut_prompts(dev_encoded, eval_cfg.max_prompt_tokens)
    references = [[decode_response(tokenizer, e.response_ids, eos)] for e in prompts]
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        gens = generate(model, tokenizer, prompts, eval_cfg, seed=eval_cfg.seeds[0] if eval_cfg.seeds else None,
                        device=device)
    names = ["rougeL"] + [m for m in ("em", "dist4") if m in eval_cfg.metrics]
    out = {f"dev/{k}": v for k, v in generation_scores(gens, references, names).items()}
    if "loss" in eval_cfg.metrics:
        out["dev/loss"] = reference_loss(model, prompts, pad_id=tokenizer.pad_token_id,
                                         batch_size=eval_cfg.batch_size, device=device)
    return out
