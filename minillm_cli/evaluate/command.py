"""`minillm eval`: evaluate checkpoints (and optionally the teacher) side by side on the same prompts.

Protocol (algorithm.md §6; defaults of `config.EvalConfig`): sampling at T = 1, top-k 0, top-p 1,
`no_repeat_ngram_size` 6, prompts cut to their last 256 tokens, ≤ 256 new tokens, seeds 10..50;
per-seed numbers are reported as mean ± sample std over seeds. Every number is a "test" number
(held-out set given with --data), unlike the dev numbers logged during training.

Metrics (`--metrics`, default rougeL,loss plus kl,agreement with a teacher). Columns they produce:

- rougeL, em, dist4: per seed over the generated responses (×100), then mean/std over seeds.
- loss: LM loss on the first reference of each example (teacher-forced, per-sample token mean,
  then mean; no sampling, so no std). A reference is cut so that prompt + reference fits
  max_prompt_tokens + max_new_tokens (the data module's length rule).
- kl (teacher needed): fkl_student, rkl_student, fkl_teacher, rkl_teacher = KL(p‖q) and KL(q‖p) in
  nats per token, averaged over the valid tokens of student- / teacher-sampled continuations of
  each seed, then mean/std over seeds.
- agreement (teacher needed): agreement_student, agreement_teacher = top-1 agreement (%) at the
  same positions.
- exposure_bias (teacher needed): the ExAccErr(l) curve (row curves["exposure_bias"]) from the
  first seed's sampled continuations (an extra sampled pass with that seed under --greedy), and
  `exaccerr@L` at one L shared by all rows: the largest l where every row still averages at least
  half of the prompts.
- calibration (labelled data + --label-words): ece (fraction, 10 bins) and accuracy (%).

The teacher row (named "<teacher> (teacher)", first) gets the metrics that need no teacher.

Paired comparisons (`--baseline NAME`): every row saw the same prompts with the same seeds, so each
other row's difference to the baseline, per column of PAIRED_COLUMNS, gets a 95% paired bootstrap
interval (`metrics.paired_bootstrap`: 2000 resamples of the prompts with a fixed seed, the seeds of a
prompt kept together); shown as a second table ("within noise" when the interval covers 0) and
written to the JSON under "comparison". `--fail-under rougeL@baseline=0` fails a row whose interval's
lower end is below 0, i.e. that is not better than the baseline with 95% confidence.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from minillm_cli import __version__
from minillm_cli import checkpoint
from minillm_cli import data as data_mod
from minillm_cli import models as models_mod
from minillm_cli.config import EvalConfig, parse_override
from minillm_cli.errors import UserError
from minillm_cli.evaluate import generate as gen_mod
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate.generate import Divergences, Generation

if TYPE_CHECKING:
    import torch

KNOWN_METRICS = ("rougeL", "em", "loss", "kl", "agreement", "exposure_bias", "calibration", "dist4")
TEACHER_METRICS = ("kl", "agreement", "exposure_bias")
REFERENCE_METRICS = ("rougeL", "em", "loss")
TEXT_METRICS = ("rougeL", "em", "dist4")
"""Scored on the generated text of each seed's pass."""
COLUMNS = {
    "rougeL": ["rougeL"], "em": ["em"], "dist4": ["dist4"], "loss": ["loss"],
    "kl": ["fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher"],
    "agreement": ["agreement_student", "agreement_teacher"],
    "exposure_bias": [],  # exaccerr@L: L is known only after generation
    "calibration": ["ece", "accuracy"],
}
"""Metric name -> the report columns it produces."""
PAIRED_COLUMNS = ("rougeL", "em", "loss", "fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher",
                  "agreement_student", "agreement_teacher", "accuracy")
"""Columns that are means over prompts (or token means), so `--baseline` gives them a paired interval;
dist4, ece and exaccerr@L are not (a corpus ratio, a binned statistic, a curve point)."""
EXACCERR_MIN_SHARE = 0.5
"""exaccerr@L: the largest l at which at least this share of the prompts still has data in every row."""
# Reference column(s) of the row formats whose prompt column is the key.
_REFERENCE_COLUMNS = {"instruction": ("output", "response"), "prompt": ("response", "completion")}


# ------------------------------------------------------------------------------------ options
def parse_metrics(text: str | None, configured: list[str] | None, has_teacher: bool) -> list[str]:
    """The metric list: `--metrics`, else `metrics` from `--set`, else rougeL,loss (+ kl,agreement
    with a teacher). Unknown names and teacher metrics without a teacher are errors.

    Raises:
        UserError: Naming the unknown metric and the known ones, or the metric that needs --teacher.
    """
    if text is not None:
        names = [m.strip() for m in text.split(",") if m.strip()]
    elif configured is not None:
        names = list(configured)
    else:
        names = ["rougeL", "loss"] + (["kl", "agreement"] if has_teacher else [])
    if not names:
        raise UserError(f"--metrics: no metric given; known metrics: {', '.join(KNOWN_METRICS)}")
    for name in names:
        if name not in KNOWN_METRICS:
            raise UserError(f"--metrics: unknown metric {name!r}; known metrics: {', '.join(KNOWN_METRICS)}")
        if name in TEACHER_METRICS and not has_teacher:
            raise UserError(f"--metrics: {name} compares with a teacher; pass --teacher MODEL")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of integers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag}: expected at least one integer, got {text!r}")
    return values


def build_eval_config(overrides: Sequence[str], named: dict[str, Any]) -> EvalConfig:
    """EvalConfig defaults < `--set key=value` (key or eval.key) < named options (None = not given).

    Raises:
        UserError: A malformed override or a value EvalConfig rejects, naming the key.
    """
    from pydantic import ValidationError

    tree: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        key = key.removeprefix("eval.")
        if "." in key:
            raise UserError(f"--set {text}: only eval settings can be set here (e.g. --set top_p=0.9)")
        tree[key] = value
    tree.update({k: v for k, v in named.items() if v is not None})
    try:
        return EvalConfig.model_validate(tree)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            msg = "unknown eval setting" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"eval.{key}: {msg} (got {err.get('input')!r})")
        raise UserError("; ".join(problems)) from None


# --------------------------------------------------------------------------------------- data
def _fill_reference(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of a row without a reference column given an empty one (metrics that need none)."""
    for prompt_col, ref_cols in _REFERENCE_COLUMNS.items():
        if prompt_col in row and not any(row.get(c) is not None for c in ref_cols):
            return {**row, ref_cols[0]: ""}
    return row


def read_eval_data(source: str, need_references: list[str]) -> tuple[list[data_mod.Example], list[dict[str, Any]]]:
    """Read the evaluation set (split "test" for hub ids) as Examples plus the raw rows.

    Args:
        source: A jsonl/json/csv/parquet file or a hub dataset id.
        need_references: The asked metrics that compare against references; when empty, rows
            without a reference column are accepted (e.g. a classification file for calibration).

    Raises:
        UserError: Empty file, unknown format, or a row without its reference column (naming the
            file:line, the column and the metrics that need it).
    """
    rows = data_mod.read_rows(source, "test")
    checked: list[tuple[str, dict[str, Any]]] = []
    for where, row in rows:
        if need_references:
            for prompt_col, ref_cols in _REFERENCE_COLUMNS.items():
                if prompt_col in row and "messages" not in row:
                    if not any(row.get(c) is not None for c in ref_cols):
                        raise UserError(
                            f"{where}: missing reference column '{ref_cols[0]}' (or '{ref_cols[1]}'); "
                            f"metric(s) {', '.join(need_references)} compare against it"
                        )
                    break
            checked.append((where, row))
        else:
            checked.append((where, _fill_reference(row)))
    first_where, first = checked[0]
    fmt = data_mod.detect_format(first, first_where)
    examples = [data_mod.row_to_example(row, fmt, where) for where, row in checked]
    return examples, [row for _, row in rows]


def read_labels(rows: Sequence[dict[str, Any]], examples: Sequence[data_mod.Example], words: list[str]) -> list[str]:
    """The `label` of every row, checked against the label words.

    Raises:
        UserError: A row without a label, or with a label that is not a label word.
    """
    labels = []
    for row, ex in zip(rows, examples):
        if row.get("label") is None:
            raise UserError(f"{ex.where}: missing column 'label' (calibration needs a labelled classification file)")
        label = str(row["label"]).strip()
        if label not in words:
            raise UserError(f"{ex.where}: label {label!r} is not one of --label-words {','.join(words)}")
        labels.append(label)
    return labels


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


# ------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A model to evaluate, resolved to local files."""

    name: str
    """Display name: what the user typed (the teacher's gets a ' (teacher)' suffix)."""
    path: Path
    """A model directory, or the LoRA adapter (step) directory when `base` is set."""
    base: Path | None = None
    """The base model directory of a LoRA adapter."""


def _is_run_dir(path: Path) -> bool:
    return (path / "latest").is_file() or bool(checkpoint.list_steps(path))


def resolve_checkpoint(arg: str, name: str | None = None, say: Callable[[str], None] | None = None) -> ModelSpec:
    """Resolve a run dir (its `latest` step), step dir, model dir, .gguf, alias or hub id.

    Raises:
        UserError: A run dir without complete checkpoint, a path that is not a model, a LoRA step
            whose base model is missing.
    """
    path = Path(arg).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if _is_run_dir(path):
            step = checkpoint.latest_step_dir(path)
            if step is None:
                raise UserError(f"{arg}: run directory without a complete checkpoint (no step-NNNNNN with meta.json)")
            path = step
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return ModelSpec(name=name or arg, path=path, base=_lora_base(path, say))
    target = str(path) if path.is_dir() else arg  # a run dir resolved to its step dir
    return ModelSpec(name=name or arg, path=models_mod.resolve_model(target, say=say))


def _lora_base(step_dir: Path, say: Callable[[str], None] | None) -> Path:
    """The base model of a LoRA step: meta.json `base_model`, else the adapter config's."""
    base = None
    if (step_dir / "meta.json").is_file():
        base = json.loads((step_dir / "meta.json").read_text(encoding="utf-8")).get("base_model")
    if not base:
        base = json.loads((step_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{step_dir}: LoRA adapter without a base model (no base_model in meta.json)")
    try:
        return models_mod.resolve_model(str(base), say=say)
    except UserError as e:
        raise UserError(f"{step_dir}: LoRA base model {base!r}: {e}") from None


def load_checkpoint(spec: ModelSpec, device: "torch.device", dtype: "torch.dtype") -> tuple["torch.nn.Module", Any]:
    """Load a resolved model and its tokenizer; a LoRA adapter is applied with peft and merged."""
    if spec.base is None:
        return models_mod.load_model(spec.path, dtype=dtype, device=device), models_mod.load_tokenizer(spec.path)
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{spec.path}: a LoRA checkpoint needs peft (pip install 'minillm[lora]')") from None
    base = models_mod.load_model(spec.base, dtype=dtype, device=device)
    checkpoint.check_weights(spec.path)  # the adapter's own file
    model = PeftModel.from_pretrained(base, str(spec.path)).merge_and_unload().eval()
    has_tokenizer = (spec.path / "tokenizer_config.json").is_file()
    return model, models_mod.load_tokenizer(spec.path if has_tokenizer else spec.base)


def _output_width(model: "torch.nn.Module") -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _free(model: "torch.nn.Module | None") -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- evaluation
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


def _passes(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, cfg: EvalConfig, device: "torch.device",
            say: Callable[[str], None], name: str) -> list[list[Generation]]:
    """One generation pass per seed (a single greedy pass under --greedy)."""
    seeds: list[int | None] = [cfg.seeds[0]] if cfg.greedy else list(cfg.seeds)
    out = []
    for seed in seeds:
        label = "greedy" if cfg.greedy else f"seed {seed}"
        say(f"{name}: generating {len(prompts.encoded)} responses ({label})")
        out.append(gen_mod.generate(model, tokenizer, prompts.encoded, cfg, seed=seed, device=device))
    return out


def _exposure_pass(passes: list[list[Generation]], model: "torch.nn.Module", tokenizer: Any, prompts: Prompts,
                   cfg: EvalConfig, device: "torch.device") -> list[Generation]:
    """Sampled continuations with the first seed: the first pass, or a new sampled one under --greedy."""
    if not cfg.greedy:
        return passes[0]
    return gen_mod.generate(model, tokenizer, prompts.encoded, cfg, seed=cfg.seeds[0], device=device, do_sample=True)


def _calibration(model: "torch.nn.Module", tokenizer: Any, prompts: Prompts, labels: list[str], words: list[str],
                 cfg: EvalConfig, device: "torch.device") -> tuple[dict[str, float], np.ndarray]:
    """ECE (fraction) and accuracy (%) from the label-word probabilities, and the (N,) per-prompt
    accuracy (0 or 100) in the order of `prompts.calibration`."""
    probs = gen_mod.label_probabilities(model, prompts.calibration, prompts.label_ids, pad_id=tokenizer.pad_token_id,
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
    passes = _passes(model, tokenizer, prompts, cfg, device, say, name) if needs_text or needs_div else []
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
            say(f"{name}: divergences from the teacher")
            for gens_s, gens_t in zip(passes, teacher.passes):
                d_s = gen_mod.continuation_divergences(model, teacher.model, gens_s, **kw)
                d_t = gen_mod.continuation_divergences(model, teacher.model, gens_t, **kw)
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
                sampled = _exposure_pass(passes, model, tokenizer, prompts, cfg, device)
                assert teacher.sampled is not None
                first = (gen_mod.continuation_divergences(model, teacher.model, sampled, **kw),
                         gen_mod.continuation_divergences(model, teacher.model, teacher.sampled, **kw))
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
    tops = [max((l for l, c in zip(cv["lengths"], cv["count"]) if c >= need), default=0) for cv in curves]
    length = min(tops)
    if length < 1:
        return None
    for row in rows:
        if report_mod.EXPOSURE_BIAS in row.curves:
            row.metrics[f"exaccerr@{length}"] = (row.curves[report_mod.EXPOSURE_BIAS]["exaccerr"][length - 1], None)
    return length


# ------------------------------------------------------------------------------------ outputs
def _baseline_name(baseline: str | None, names: list[str], teacher: str | None) -> str | None:
    """The report row `--baseline` names: a model as given on the command line, or the teacher (by
    its row name or as given to --teacher).

    Raises:
        UserError: No such model, or nothing left to compare with it.
    """
    if baseline is None:
        return None
    name = baseline
    if name not in names and teacher is not None and name == teacher:
        name = f"{teacher} (teacher)"
    if name not in names:
        raise UserError(f"--baseline {baseline!r}: not one of the evaluated models: {', '.join(names)}")
    if len(names) < 2:
        raise UserError(f"--baseline {baseline!r}: give at least one other model to compare with it")
    return name


def _check_fail_under(specs: list[str], metric_names: list[str], names: list[str], baseline: str | None = None) -> None:
    """Reject malformed --fail-under specs before any model runs (exaccerr@L is checked at the end)."""
    columns = [c for m in metric_names for c in COLUMNS[m]]
    rows = [report_mod.ModelRow(name=n, metrics={c: (math.inf, None) for c in columns}) for n in names]
    comparison = None
    if baseline is not None:  # every paired column of every other row, infinitely better
        inf = metrics_mod.PairedDifference(diff=math.inf, low=math.inf, high=math.inf, prompts=1)
        comparison = report_mod.Comparison(baseline=baseline, differences={
            n: {c: inf for c in columns if c in PAIRED_COLUMNS} for n in names if n != baseline})
    early = [s for s in specs if "exaccerr@" not in s]
    for spec in early:
        metric = report_mod.parse_spec(spec)[1]
        base = metric.removesuffix(report_mod.BASELINE_SUFFIX)
        if base != metric and base in columns and base not in PAIRED_COLUMNS:
            raise UserError(f"--fail-under {spec!r}: {base} is not a mean over prompts, so it has no paired "
                            f"interval; paired: {', '.join(c for c in columns if c in PAIRED_COLUMNS)}")
    report_mod.check_thresholds(report_mod.EvalReport(settings={}, rows=rows, comparison=comparison), early)


def _sample_rows(name: str, tokenizer: Any, passes: list[list[Generation]], references: list[list[str]],
                 encoded: list[data_mod.Encoded]) -> list[dict[str, Any]]:
    ref_by_index = {e.index: refs for e, refs in zip(encoded, references)}
    return [
        {"model": name, "seed": g.seed, "index": g.index, "prompt": tokenizer.decode(g.prompt_ids),
         "response": g.text, "references": ref_by_index[g.index]}
        for gens in passes for g in gens
    ]


def _check_writable(flag: str, path: str) -> None:
    """Refuse an output path that cannot be written, before the (long) evaluation runs."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a directory")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path}: {target} is not writable")


def _written(flag: str, path: str, write: Callable[[], None]) -> None:
    try:
        write()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write ({e.strerror or e})") from None


def _write_text(path: str, text: str) -> None:
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def run_eval(
    *,
    models: list[str],
    data: str,
    teacher: str | None = None,
    metrics: str | None = None,
    seeds: str | None = None,
    greedy: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    label_words: str | None = None,
    json_out: str | None = None,
    samples_out: str | None = None,
    plot_out: str | None = None,
    fail_under: list[str] | None = None,
    baseline: str | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> int:
    """Evaluate `models` (and the teacher) on `data` and report; the engine of `minillm eval`.

    Args:
        models: Run dirs (latest step), step dirs, model dirs, .gguf files, aliases or hub ids.
        data: Evaluation file (jsonl/json/csv/parquet) or hub id (split "test").
        teacher: Optional teacher: evaluated too, and needed by kl, agreement and exposure_bias.
        metrics: Comma list (see module docstring); None = rougeL,loss (+ kl,agreement with a teacher).
        seeds: Comma list of sampling seeds (default 10,20,30,40,50).
        greedy: Greedy decoding (one pass).
        max_samples: Evaluate the first N examples only.
        max_new_tokens: New tokens per response.
        batch_size: Prompts per batch.
        label_words: Comma list of label words (calibration).
        json_out: Write the report JSON here ('-' = stdout; the table then goes to stderr).
        samples_out: Write the generations as jsonl here.
        plot_out: Write the exposure-bias PNG here (needs the exposure_bias metric).
        fail_under: `[MODEL:]METRIC=VALUE` thresholds, or `[MODEL:]METRIC@baseline=VALUE` on the lower
            end of the interval of the difference to the baseline.
        baseline: A model (as named on the command line, or the teacher) that every other row is
            compared with: per metric the difference and its 95% paired bootstrap interval.
        overrides: `key=value` EvalConfig overrides (`--set`).
        console: Where the table and progress go (default: stdout).

    Returns:
        0, or 1 when a --fail-under threshold is not met (the failures are printed).

    Raises:
        UserError: Any bad input (metric, data, model, option), before models are loaded where possible.
    """
    import torch

    fail_under = list(fail_under or [])
    console = console or Console()
    out = Console(stderr=True) if json_out == "-" else console

    def say(text: str) -> None:
        out.print(text, highlight=False, markup=False)

    # 1. Options, data and model paths: every user error before the first model is loaded.
    if not models:
        raise UserError("no model to evaluate; pass at least one MODEL")
    named = {"greedy": True if greedy else None, "max_samples": max_samples, "max_new_tokens": max_new_tokens,
             "batch_size": batch_size, "seeds": _parse_int_list(seeds, "--seeds") if seeds is not None else None}
    cfg = build_eval_config(overrides or [], named)
    if not cfg.seeds:
        raise UserError("eval.seeds: give at least one seed (the first one also seeds greedy and exposure-bias passes)")
    configured = cfg.metrics if "metrics" in cfg.model_fields_set else None  # given with --set
    metric_names = parse_metrics(metrics, configured, teacher is not None)
    cfg = cfg.model_copy(update={"metrics": metric_names})
    words = [w.strip() for w in (label_words or "").split(",") if w.strip()]
    if "calibration" in metric_names and len(words) < 2:
        raise UserError("--label-words: the calibration metric needs at least two comma-separated label words")
    if plot_out is not None and "exposure_bias" not in metric_names:
        raise UserError("--plot draws the exposure-bias curve; add exposure_bias to --metrics (needs --teacher)")
    names = ([f"{teacher} (teacher)"] if teacher else []) + list(models)
    baseline_name = _baseline_name(baseline, names, teacher)
    _check_fail_under(fail_under, metric_names, names, baseline_name)
    for flag, path in (("--json", json_out), ("--samples", samples_out), ("--plot", plot_out)):
        if path is not None and path != "-":
            _check_writable(flag, path)

    need_refs = [m for m in REFERENCE_METRICS if m in metric_names]
    examples, rows = read_eval_data(data, need_refs)
    examples = data_mod.with_system(examples, cfg.system_prompt)
    if cfg.max_samples is not None:
        examples, rows = examples[: cfg.max_samples], rows[: cfg.max_samples]
    labels = read_labels(rows, examples, words) if "calibration" in metric_names else []
    teacher_spec = resolve_checkpoint(teacher, name=names[0], say=say) if teacher else None
    specs = [resolve_checkpoint(m, say=say) for m in models]

    # 2. Teacher first: its passes are the teacher-sampled continuations of every student row.
    device = models_mod.pick_device("auto")
    dtype = models_mod.pick_dtype("auto", device)
    calibrate = "calibration" in metric_names
    report_rows: list[report_mod.ModelRow] = []
    samples: list[dict[str, Any]] = []
    teacher_state: TeacherState | None = None
    teacher_tok: Any = None
    prompts: Prompts | None = None
    templates: dict[str, str] = {}
    if teacher_spec is not None:
        say(f"loading teacher {teacher_spec.path}")
        t_model, teacher_tok = load_checkpoint(teacher_spec, device, dtype)
        prompts = encode_prompts(teacher_tok, examples, cfg, words, calibrate)  # shared by all rows
        say(f"data: {prompts.summary} (template: {prompts.template})")
        row, passes = evaluate_model(teacher_spec.name, t_model, teacher_tok, prompts, cfg, metric_names, device,
                                     teacher=None, labels=labels, words=words, say=say)
        if any(m in metric_names for m in TEACHER_METRICS) and not passes:
            passes = _passes(t_model, teacher_tok, prompts, cfg, device, say, teacher_spec.name)
        sampled = None
        if "exposure_bias" in metric_names:
            sampled = _exposure_pass(passes, t_model, teacher_tok, prompts, cfg, device)
        teacher_state = TeacherState(model=t_model, passes=passes, sampled=sampled, width=_output_width(t_model))
        report_rows.append(row)
        templates[teacher_spec.name] = prompts.template
        samples += _sample_rows(teacher_spec.name, teacher_tok, passes, prompts.references, prompts.encoded)

    # 3. Students one at a time (only one student in memory).
    for spec in specs:
        say(f"loading {spec.path}" + (f" (LoRA on {spec.base})" if spec.base else ""))
        model, tok = load_checkpoint(spec, device, dtype)
        if teacher_state is not None:
            models_mod.check_tokenizers(teacher_tok, tok, teacher_vocab=teacher_state.width,
                                        student_vocab=_output_width(model))
            row_prompts = prompts
        else:
            row_prompts = encode_prompts(tok, examples, cfg, words, calibrate)
            say(f"data: {row_prompts.summary} (template: {row_prompts.template})")
        assert row_prompts is not None
        templates[spec.name] = row_prompts.template
        row, passes = evaluate_model(spec.name, model, tok, row_prompts, cfg, metric_names, device,
                                     teacher=teacher_state, labels=labels, words=words, say=say)
        report_rows.append(row)
        samples += _sample_rows(spec.name, tok, passes, row_prompts.references, row_prompts.encoded)
        _free(model)
    if teacher_state is not None:
        _free(teacher_state.model)
        teacher_state = None

    # 4. Report.
    n_prompts = len(examples)
    exaccerr_length = add_exaccerr(report_rows, n_prompts)
    source = Path(data).expanduser()
    settings: dict[str, Any] = {
        "split": "test",
        "metrics": metric_names,
        "seeds": None if cfg.greedy else cfg.seeds,
        "decoding": {
            "greedy": cfg.greedy, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_prompt_tokens": cfg.max_prompt_tokens,
            "prompt_cut": "keep last tokens", "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
            "generator": "transformers generate",
        },
        "data": {"path": data, "sha256": data_mod.file_sha256(source) if source.is_file() else None,
                 "examples": n_prompts, "max_samples": cfg.max_samples},
        "templates": templates,
        "models": [{"name": s.name, "path": str(s.path), "lora_base": str(s.base) if s.base else None} for s in specs],
        "teacher": ({"name": teacher_spec.name, "path": str(teacher_spec.path),
                     "lora_base": str(teacher_spec.base) if teacher_spec.base else None} if teacher_spec else None),
        "label_words": words or None,
        "exposure_bias": ({"seed": cfg.seeds[0], "length": exaccerr_length, "min_share": EXACCERR_MIN_SHARE}
                          if "exposure_bias" in metric_names else None),
        "units": {"rougeL": "%", "em": "%", "dist4": "%", "agreement": "%", "accuracy": "%",
                  "loss": "nats/token", "kl": "nats/token", "ece": "fraction", "exaccerr": "%"},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "minillm_version": __version__, "torch_version": torch.__version__,
    }
    comparison = report_mod.compare(report_rows, baseline_name) if baseline_name is not None else None
    report = report_mod.EvalReport(settings=settings, rows=report_rows, split="test", comparison=comparison)
    out.print(report_mod.render_table(report))
    if json_out == "-":
        console.file.write(json.dumps(report_mod.to_json(report), indent=2, allow_nan=False) + "\n")
    elif json_out is not None:
        _written("--json", json_out, lambda: report_mod.write_json(report, Path(json_out).expanduser()))
        say(f"wrote {json_out}")
    if samples_out is not None:
        _write_text(samples_out, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        say(f"wrote {len(samples)} samples to {samples_out}")
    if plot_out is not None:
        _written("--plot", plot_out, lambda: report_mod.plot_exposure_bias(report, Path(plot_out).expanduser()))
        say(f"wrote {plot_out}")

    failures = report_mod.check_thresholds(report, fail_under)
    for line in failures:
        out.print(f"[bold red]fail-under:[/] {line}", highlight=False)
    return 1 if failures else 0
