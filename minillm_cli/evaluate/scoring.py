"""Scoring of one model in `minillm eval`: its generation passes (one per seed), the reference loss,
divergences from the teacher, exposure bias and calibration, gathered into one report row."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from minillm_cli.config.schema import EvalConfig
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError
from minillm_cli.evaluate import distribution
from minillm_cli.evaluate import generate as gen_mod
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate.distribution import Divergences
from minillm_cli.evaluate.generate import Generation
from minillm_cli.evaluate.options import COLUMNS, TEACHER_METRICS, TEXT_METRICS
from minillm_cli.progress import Phase

if TYPE_CHECKING:
    import torch

EXACCERR_MIN_SHARE = 0.5
"""exaccerr@L: the largest l at which at least this share of the prompts still has data in every row."""


def label_token_ids(tokenizer: Any, prompt_text: str, words: list[str]) -> list[int]:
    """The first token of each label word as it would follow the rendered prompt.

    Tokenises prompt + word and takes the first id after the prompt's ids (so a tokenizer that
    merges a leading space or marks word starts gets the id the model would actually produce);
    falls back to the word tokenised alone if the prompt's ids are not a prefix.

    Raises:
        UserError: Two label words sharing their first token.
    """
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = []
    for word in words:
        full = tokenizer(prompt_text + word, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            ids.append(full[len(prompt)])
        else:
            ids.append(tokenizer(word, add_special_tokens=False)["input_ids"][0])
    for i, a in enumerate(ids):
        for j in range(i):
            if ids[j] == a:
                raise UserError(
                    f"--label-words: {words[j]!r} and {words[i]!r} start with the same token; "
                    "use label words that differ in their first token"
                )
    return ids


@dataclass
class Prompts:
    """The evaluation set as one tokenizer sees it."""

    encoded: list[data_mod.Encoded]
    """Prompts (cut) + first reference (EOS appended, cut by the length rule) per example."""
    references: list[list[str]]
    """All references per encoded example."""
    calibration: list[data_mod.Encoded]
    """Calibration prompts (no response); empty unless calibration is asked."""
    label_ids: list[int]
    """First token of each label word."""
    template: str
    summary: str


def encode_prompts(
    tokenizer: Any, examples: list[data_mod.Example], cfg: EvalConfig, label_words: list[str], calibrate: bool
) -> Prompts:
    """Render (chat template if any, else the instruction template) and tokenise the evaluation set."""
    template = data_mod.resolve_template("auto", tokenizer)
    encoded, stats = data_mod.encode_examples(
        examples, tokenizer, template=template, max_prompt_tokens=cfg.max_prompt_tokens,
        max_total_tokens=cfg.max_prompt_tokens + cfg.max_new_tokens, overlong="truncate",
    )
    label_ids: list[int] = []
    if calibrate:
        label_ids = label_token_ids(tokenizer, data_mod.render_prompt(examples[0], tokenizer, template), label_words)
    return Prompts(
        encoded=encoded, references=[examples[e.index].references for e in encoded],
        calibration=encoded if calibrate else [], label_ids=label_ids, template=template, summary=stats.summary(),
    )


@dataclass
class TeacherState:
    """The loaded teacher and its continuations, shared by every student row."""

    model: "torch.nn.Module"
    passes: list[list[Generation]]
    """One list of generations per seed (one for greedy)."""
    sampled: list[Generation] | None
    """Sampled continuations with the first seed, for exposure bias (the first pass unless greedy)."""
    width: int
    """Output head rows."""
    logits_cache: list[dict[int, "torch.Tensor"]] | None = None
    """Per pass, the teacher's response logits of its own continuations by batch (filled by the
    first student scored on them, reused by the others), or None when they would not fit
    TEACHER_CACHE_BYTES."""


TEACHER_CACHE_BYTES = 2 * 1024**3
"""Most memory the teacher's logits of its own continuations may take to be kept across students
(fp32 (N, T, V) per seed: 64 prompts × 32 tokens × 49k vocabulary ≈ 0.4 GB); above it they are
recomputed for every student."""


def teacher_cache(passes: list[list[Generation]], max_new_tokens: int, width: int) -> list[dict[int, "torch.Tensor"]] | None:
    """Empty per-pass caches for `TeacherState.logits_cache`, or None when the logits would not fit."""
    size = sum(len(p) for p in passes) * max_new_tokens * width * 4
    return [{} for _ in passes] if size <= TEACHER_CACHE_BYTES else None


def generation_passes(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, cfg: EvalConfig, device: "torch.device",
            say: Callable[[str], None], name: str) -> list[list[Generation]]:
    """One generation pass per seed (a single greedy pass under --greedy)."""
    seeds: list[int | None] = [cfg.seeds[0]] if cfg.greedy else list(cfg.seeds)
    out = []
    for seed in seeds:
        label = "greedy" if cfg.greedy else f"seed {seed}"
        say(f"{name}: generating {len(prompts.encoded)} responses ({label})")
        out.append(gen_mod.generate(model, tokenizer, prompts.encoded, cfg, seed=seed, device=device))
    return out


def exposure_pass(passes: list[list[Generation]], model: "torch.nn.Module", tokenizer: Any, prompts: Prompts,
                   cfg: EvalConfig, device: "torch.device") -> list[Generation]:
    """Sampled continuations with the first seed: the first pass, or a new sampled one under --greedy."""
    if not cfg.greedy:
        return passes[0]
    return gen_mod.generate(model, tokenizer, prompts.encoded, cfg, seed=cfg.seeds[0], device=device, do_sample=True)


def _calibration(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, labels: list[str], words: list[str],
                 cfg: EvalConfig, device: "torch.device") -> tuple[dict[str, float], np.ndarray]:
    """ECE (fraction) and accuracy (%) from the label-word probabilities, and the (N,) per-prompt
    accuracy (0 or 100) in the order of `prompts.calibration`."""
    probs = distribution.label_probabilities(model, prompts.calibration, prompts.label_ids, pad_id=tokenizer.pad_token_id,
                                        batch_size=cfg.batch_size, device=device)  # (N, K)
    predictions = [words[k] for k in probs.argmax(-1)]
    gold = [labels[e.index] for e in prompts.calibration]
    confidences = probs.max(-1).clip(0.0, 1.0).tolist()
    return {
        "ece": metrics_mod.expected_calibration_error(confidences, predictions, gold, n_bins=10),
        "accuracy": metrics_mod.accuracy(predictions, gold),
    }, 100.0 * np.array([p == y for p, y in zip(predictions, gold)], dtype=np.float64)


def evaluate_model(
    name: str,
    model: "torch.nn.Module",
    tokenizer: Any,
    prompts: Prompts,
    cfg: EvalConfig,
    metric_names: list[str],
    device: "torch.device",
    *,
    teacher: TeacherState | None,
    labels: list[str],
    words: list[str],
    say: Callable[[str], None],
    console: Any = None,
) -> tuple[report_mod.ModelRow, list[list[Generation]]]:
    """All asked metrics of one model; teacher metrics only when `teacher` is given.

    Returns:
        The report row and the generation passes (for --samples and, for the teacher, reuse).
    """
    per_seed: dict[str, list[float]] = {}
    fixed: dict[str, float] = {}
    curves: dict[str, dict[str, Any]] = {}
    # Per seed and prompt, for paired comparisons (`report.compare`): column -> (index, [values per
    # seed], [weights per seed] or None); the reported mean is recomputable from them.
    parts: dict[str, tuple[list[int], list[np.ndarray], list[np.ndarray] | None]] = {}

    def add(key: str, value: float) -> None:
        per_seed.setdefault(key, []).append(value)

    def add_prompts(key: str, index: list[int], values: np.ndarray, weights: np.ndarray | None = None) -> None:
        _, vs, ws = parts.setdefault(key, (index, [], None if weights is None else []))
        vs.append(values)
        if ws is not None and weights is not None:
            ws.append(weights)

    needs_text = any(m in metric_names for m in TEXT_METRICS)
    needs_div = teacher is not None and any(m in metric_names for m in TEACHER_METRICS)
    passes = generation_passes(model, tokenizer, prompts, cfg, device, say, name) if needs_text or needs_div else []
    text_names = [m for m in TEXT_METRICS if m in metric_names]
    for gens in passes:
        per_example = (gen_mod.per_example_scores(gens, prompts.references, text_names)
                       if {"rougeL", "em"} & set(text_names) else {})
        for key, value in gen_mod.generation_scores(gens, prompts.references, text_names, per_example).items():
            add(key, value)
        for key, scores in per_example.items():
            add_prompts(key, [g.index for g in gens], scores)
    if "loss" in metric_names:
        say(f"{name}: reference loss")
        index, losses = gen_mod.reference_losses(model, prompts.encoded, pad_id=tokenizer.pad_token_id,
                                                 batch_size=cfg.batch_size, device=device)
        fixed["loss"] = float(np.mean(losses)) if losses.size else float("nan")
        if losses.size:
            add_prompts("loss", index, losses)

    if needs_div:
        assert teacher is not None  # for the type checker: needs_div implies a teacher
        kw = dict(pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, device=device, width=cfg.max_new_tokens)
        first: tuple[Divergences, Divergences] | None = None
        if "kl" in metric_names or "agreement" in metric_names:
            caches: list[dict[int, torch.Tensor] | None] = (
                list(teacher.logits_cache) if teacher.logits_cache is not None else [None] * len(teacher.passes))
            phase = Phase(f"{name}: divergences from the teacher", 2 * len(passes), "passes", console, say)
            with phase:
                divergences = []
                for gens_s, gens_t, cache in zip(passes, teacher.passes, caches):
                    d_s = distribution.continuation_divergences(model, teacher.model, gens_s, **kw)
                    phase.advance()
                    d_t = distribution.continuation_divergences(model, teacher.model, gens_t, teacher_cache=cache, **kw)
                    phase.advance()
                    divergences.append((gens_s, gens_t, d_s, d_t))
            for gens_s, gens_t, d_s, d_t in divergences:
                first = first or (d_s, d_t)
                for who, d, gens in (("student", d_s, gens_s), ("teacher", d_t, gens_t)):
                    index = [g.index for g in gens]
                    if "kl" in metric_names:
                        add(f"fkl_{who}", d.token_mean("fkl"))
                        add(f"rkl_{who}", d.token_mean("rkl"))
                        add_prompts(f"fkl_{who}", index, *d.per_row("fkl"))
                        add_prompts(f"rkl_{who}", index, *d.per_row("rkl"))
                    if "agreement" in metric_names:
                        add(f"agreement_{who}", 100.0 * d.token_mean("agree"))
                        agree, count = d.per_row("agree")
                        add_prompts(f"agreement_{who}", index, 100.0 * agree, count)
        if "exposure_bias" in metric_names:
            if first is None or cfg.greedy:  # divergences of the sampled first-seed continuations
                sampled = exposure_pass(passes, model, tokenizer, prompts, cfg, device)
                assert teacher.sampled is not None
                first = (distribution.continuation_divergences(model, teacher.model, sampled, **kw),
                         distribution.continuation_divergences(model, teacher.model, teacher.sampled, **kw))
            d_s, d_t = first
            curves[report_mod.EXPOSURE_BIAS] = metrics_mod.exposure_bias_curve(d_s.fkl, d_t.fkl, d_s.mask, d_t.mask)

    if "calibration" in metric_names:
        say(f"{name}: calibration")
        calibration, correct = _calibration(model, tokenizer, prompts, labels, words, cfg, device)
        fixed.update(calibration)
        add_prompts("accuracy", [e.index for e in prompts.calibration], correct)

    # Columns in the order of COLUMNS, whatever order they were computed in.
    values: dict[str, tuple[float, float | None]] = {}
    for column in (c for m in COLUMNS for c in COLUMNS[m]):
        if column in per_seed:
            values[column] = metrics_mod.mean_std(per_seed[column])
        elif column in fixed:
            values[column] = (fixed[column], None)
    per_prompt = {key: report_mod.PerPrompt(index=index, values=np.stack(vs),
                                            weights=None if ws is None else np.stack(ws))
                  for key, (index, vs, ws) in parts.items() if key in values}
    return report_mod.ModelRow(name=name, metrics=values, curves=curves, per_prompt=per_prompt), passes


def add_exaccerr(rows: list[report_mod.ModelRow], n_prompts: int) -> int | None:
    """Add `exaccerr@L` to every row with an exposure-bias curve, at one L shared by all of them.

    L is the largest length at which every such row still averages at least
    `EXACCERR_MIN_SHARE` of the prompts (and at least one).

    Returns:
        L, or None when some row has no such length (then no scalar is added).
    """
    curves = [row.curves[report_mod.EXPOSURE_BIAS] for row in rows if report_mod.EXPOSURE_BIAS in row.curves]
    if not curves:
        return None
    need = max(1, math.ceil(EXACCERR_MIN_SHARE * n_prompts))
    tops = [max((n for n, c in zip(cv["lengths"], cv["count"]) if c >= need), default=0) for cv in curves]
    length = min(tops)
    if length < 1:
        return None
    for row in rows:
        if report_mod.EXPOSURE_BIAS in row.curves:
            row.metrics[f"exaccerr@{length}"] = (row.curves[report_mod.EXPOSURE_BIAS]["exaccerr"][length - 1], None)
    return length
