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
from minillm_cli.evaluate import distribution, stopping
from minillm_cli.evaluate import generate as gen_mod
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate.distribution import Divergences
from minillm_cli.evaluate.generate import Generation
from minillm_cli.evaluate.options import COLUMNS, TEACHER_METRICS, TEXT_METRICS
from minillm_cli.models.loading import eos_ids
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
    tokenizer: Any = None
    """The teacher's tokenizer (students of another tokenizer are compared on text: `sequence_kl`)."""
    prompts: dict[int, list[int]] | None = None
    """The teacher's prompt ids by example index."""
    eos: list[int] | None = None
    """Ids that end the teacher's responses."""


TEACHER_CACHE_BYTES = 256 * 1024**2
"""Most memory the teacher's logits of its own continuations may take to be kept across students
(fp32 (N, T, V) per seed: 64 prompts × 32 tokens × 49k vocabulary ≈ 0.4 GB); above it they are
recomputed for every student (a teacher forward per batch: cheaper than holding a model's worth of
logits on a small machine)."""


def teacher_cache(passes: list[list[Generation]], max_new_tokens: int, width: int) -> list[dict[int, "torch.Tensor"]] | None:
    """Empty per-pass caches for `TeacherState.logits_cache`, or None when the logits would not fit."""
    size = sum(len(p) for p in passes) * max_new_tokens * width * 4
    return [{} for _ in passes] if size <= TEACHER_CACHE_BYTES else None


def generation_passes(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, cfg: EvalConfig, device: "torch.device",
            say: Callable[[str], None], name: str) -> list[list[Generation]]:
    """One generation pass per seed (a single greedy pass under --greedy)."""
    seeds: list[int | None] = [cfg.seeds[0]] if cfg.greedy else list(cfg.seeds)
    label = "greedy" if cfg.greedy else f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    say(f"{name}: generating {len(prompts.encoded)} responses ({label})")
    return [gen_mod.generate(model, tokenizer, prompts.encoded, cfg, seed=seed, device=device) for seed in seeds]


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
    cross = teacher is not None and teacher.tokenizer is not None and not same_vocabulary(teacher.tokenizer, tokenizer)
    for m in ("exposure_bias", "eos"):
        if cross and m in metric_names:
            raise UserError(f"--metrics: {m} compares next-token distributions id by id; {name} has another "
                            "tokenizer than the teacher (kl is compared on text across tokenizers)")
    eos = eos_ids(model, tokenizer)
    passes = generation_passes(model, tokenizer, prompts, cfg, device, say, name) if needs_text or needs_div else []
    text_names = [m for m in TEXT_METRICS if m in metric_names]
    for gens in passes:
        per_example = (gen_mod.per_example_scores(gens, prompts.references, text_names)
                       if {"rougeL", "em"} & set(text_names) else {})
        for key, value in gen_mod.generation_scores(gens, prompts.references, text_names, per_example).items():
            add(key, value)
        for key, scores in per_example.items():
            add_prompts(key, [g.index for g in gens], scores)
        if "length" in metric_names:  # tokens before the EOS, and whether the response stopped by itself
            ended = [bool(g.response_ids) and g.response_ids[-1] in eos for g in gens]
            stopped = 100.0 * np.array(ended, dtype=np.float64)
            lengths = np.array([len(g.response_ids) - int(e) for g, e in zip(gens, ended)], dtype=np.float64)
            add("length", float(lengths.mean()))
            add("stopped", float(stopped.mean()))
            add_prompts("length", [g.index for g in gens], lengths)
            add_prompts("stopped", [g.index for g in gens], stopped)
    if "length" in metric_names and passes:
        all_lengths = [len(g.response_ids) - int(bool(g.response_ids) and g.response_ids[-1] in eos)
                       for gens in passes for g in gens]
        curves["length"] = stopping.length_quantiles(all_lengths)
    if "loss" in metric_names:
        say(f"{name}: reference loss")
        index, losses = gen_mod.reference_losses(model, prompts.encoded, pad_id=tokenizer.pad_token_id,
                                                 batch_size=cfg.batch_size, device=device)
        fixed["loss"] = float(np.mean(losses)) if losses.size else float("nan")
        if losses.size:
            add_prompts("loss", index, losses)

    if needs_div and cross:
        assert teacher is not None
        if "kl" in metric_names:
            say(f"{name}: text-level KL to the teacher (another tokenizer)")
            for gens_s, gens_t in zip(passes, teacher.passes):
                for key, (index, ratios, weights) in sequence_kl(model, tokenizer, prompts, teacher, gens_s, gens_t,
                                                                 cfg, device).items():
                    add(key, float((ratios * weights).sum() / max(1.0, weights.sum())))
                    add_prompts(key, index, ratios * weights, weights)
    elif needs_div:
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
                    d_s = distribution.continuation_divergences(model, teacher.model, gens_s, eos=eos, **kw)
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
        if "eos" in metric_names:  # stopping on the model's own samples, first seed
            d_eos = first[0] if first is not None and first[0].q_eos is not None else \
                distribution.continuation_divergences(model, teacher.model, passes[0], eos=eos, **kw)
            assert d_eos.q_eos is not None and d_eos.p_eos is not None
            gap = (d_eos.q_eos - d_eos.p_eos) * d_eos.mask
            add("eos_gap", 100.0 * float(gap.sum() / max(1.0, d_eos.mask.sum())))
            add_prompts("eos_gap", [g.index for g in passes[0]], 100.0 * gap.sum(-1).astype(np.float64),
                        d_eos.mask.sum(-1).astype(np.float64))
            curves["eos"] = stopping.eos_curves(d_eos.q_eos, d_eos.p_eos, d_eos.mask)
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


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same ids to the same tokens (then token-level metrics apply)."""
    return a is b or a.get_vocab() == b.get_vocab()


def sequence_kl(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, teacher: TeacherState,
                gens_s: list[Generation], gens_t: list[Generation], cfg: EvalConfig,
                device: "torch.device") -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """KL between a student and a teacher of ANOTHER tokenizer, on text, for one seed's samples:

        rkl_seq_student   = E_{y~q}[log q(y) − log p(text(y))]    on the student's samples
        fkl_seq_teacher   = E_{y~p}[log p(y) − log q(text(y))]    on the teacher's samples
        tnll_char_student = Σ −log p(text(y)) / Σ characters      the teacher's NLL of the student's answers

    in nats per response (per character for the last; EOS counts as one), each text scored by the other model after its own prompt, re-tokenised with
    its own tokenizer (docs/algorithm.md §7). A sample whose text does not survive the other side's
    round trip gets weight 0.

    Returns:
        column -> (example index per sample, (N,) log-ratios, (N,) weights 0/1).
    """
    assert teacher.tokenizer is not None and teacher.prompts is not None and teacher.eos is not None
    own = {e.index: e.prompt_ids for e in prompts.encoded}
    bs = cfg.batch_size
    out = {}
    log_q = distribution.own_logprobs(model, gens_s, pad_id=tokenizer.pad_token_id, batch_size=bs, device=device)
    texts = distribution.generation_texts(tokenizer, gens_s, eos_ids(model, tokenizer))
    log_p, ok = distribution.text_logprobs(teacher.model, teacher.tokenizer, teacher.prompts, texts, batch_size=bs,
                                           device=device)
    index = [g.index for g in gens_s]
    out["rkl_seq_student"] = (index, log_q - log_p, ok.astype(np.float64))
    # the teacher's NLL per character of the student's answers (weights: each answer's characters)
    chars = np.array([len(text) + int(finished) for _, text, finished in texts], dtype=np.float64) * ok
    out["tnll_char_student"] = (index, -log_p / np.maximum(chars, 1.0), chars)
    t_pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else teacher.tokenizer.eos_token_id
    log_p = distribution.own_logprobs(teacher.model, gens_t, pad_id=t_pad, batch_size=bs, device=device)
    log_q, ok = distribution.text_logprobs(model, tokenizer, own,
                                           distribution.generation_texts(teacher.tokenizer, gens_t, teacher.eos),
                                           batch_size=bs, device=device)
    out["fkl_seq_teacher"] = ([g.index for g in gens_t], log_p - log_q, ok.astype(np.float64))
    return out
