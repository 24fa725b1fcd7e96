"""Options of `minillm eval`, checked before any model is loaded: the metric list and the report
columns each metric produces, `--seeds`, `--set` overrides, `--baseline`, `--fail-under` and the
output paths (see `evaluate.command` for the protocol)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minillm_cli.config.loading import parse_override
from minillm_cli.config.schema import EvalConfig
from minillm_cli.errors import UserError
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate import thresholds

KNOWN_METRICS = ("rougeL", "em", "loss", "kl", "agreement", "exposure_bias", "calibration", "dist4", "length", "eos")
TEACHER_METRICS = ("kl", "agreement", "exposure_bias", "eos")
REFERENCE_METRICS = ("rougeL", "em", "loss")
TEXT_METRICS = ("rougeL", "em", "dist4", "length")
"""Scored on the generated text of each seed's pass."""
COLUMNS = {
    "rougeL": ["rougeL"], "em": ["em"], "dist4": ["dist4"], "loss": ["loss"],
    "kl": ["fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher", "rkl_seq_student", "fkl_seq_teacher",
           "tnll_char_student"],
    "agreement": ["agreement_student", "agreement_teacher"],
    "exposure_bias": [],  # exaccerr@L: L is known only after generation
    "calibration": ["ece", "accuracy"],
    "length": ["length", "stopped"],
    "eos": ["eos_gap"],
}
"""Metric name -> the report columns it produces."""
PAIRED_COLUMNS = ("rougeL", "em", "loss", "fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher",
                  "rkl_seq_student", "fkl_seq_teacher", "tnll_char_student", "length", "stopped", "eos_gap",
                  "agreement_student", "agreement_teacher", "accuracy")
"""Columns that are means over prompts (or token means), so `--baseline` gives them a paired interval;
dist4, ece and exaccerr@L are not (a corpus ratio, a binned statistic, a curve point)."""


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


def parse_int_list(text: str, flag: str) -> list[int]:
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
            if err["type"] == "bool_as_number":  # raised for the section: the field is in its context
                problems.append(f"eval.{err['ctx']['key']}: {msg}")
                continue
            shown = repr(err.get("input"))
            problems.append(f"eval.{key}: {msg} (got {shown if len(shown) <= 80 else shown[:80] + '…'})")
        raise UserError("; ".join(problems)) from None


def baseline_row(baseline: str | None, names: list[str], teacher: str | None) -> str | None:
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


def check_fail_under(specs: list[str], metric_names: list[str], names: list[str], baseline: str | None = None) -> None:
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
        metric = thresholds.parse_spec(spec)[1]
        base = metric.removesuffix(thresholds.BASELINE_SUFFIX)
        if base != metric and base in columns and base not in PAIRED_COLUMNS:
            raise UserError(f"--fail-under {spec!r}: {base} is not a mean over prompts, so it has no paired "
                            f"interval; paired: {', '.join(c for c in columns if c in PAIRED_COLUMNS)}")
    thresholds.check_thresholds(report_mod.EvalReport(settings={}, rows=rows, comparison=comparison), early)


@dataclass
class EvalRequest:
    """An evaluation, checked before any model is loaded: what to score, on what, how, against what."""

    cfg: EvalConfig
    metric_names: list[str]
    words: list[str]
    """Label words (calibration)."""
    examples: list[Any]
    """The evaluation examples (rows.Example), cut to max_samples, with the system prompt."""
    labels: list[str]
    """The label word of each example (calibration), else empty."""
    teacher_spec: Any
    """`checkpoints.Checkpoint` of the teacher, or None."""
    specs: list[Any]
    """`checkpoints.Checkpoint` of every model, in order."""
    baselines: list[str]
    """Report rows every other row is compared with (the first is the report's comparison)."""
    row_metrics: dict[str, list[str]]
    fail_under: list[str]


def check_request(*, models: list[str], data: str, teacher: str | None, metrics: str | None, seeds: str | None,
                  greedy: bool, max_samples: int | None, max_new_tokens: int | None, batch_size: int | None,
                  label_words: str | None, outputs: dict[str, str | None], fail_under: list[str],
                  baseline: str | Sequence[str] | None, row_metrics: dict[str, list[str]], overrides: list[str],
                  say: Callable[[str], None]) -> EvalRequest:
    """Every user error of `minillm eval` (options, output paths, data, model paths), before any model loads.

    Raises:
        UserError: naming the flag, key, file or model.
    """
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.evaluate.checkpoints import resolve_checkpoint
    from minillm_cli.evaluate.dataset import read_eval_data, read_labels
    from minillm_cli.runs.destinations import check_distinct, check_file, check_home, existing_path

    if not models:
        raise UserError("no model to evaluate; pass at least one MODEL")
    for flag, value in (("--data", data), ("--teacher", teacher), *(("model", m) for m in models)):
        check_home(flag, value)
    named = {"greedy": True if greedy else None, "max_samples": max_samples, "max_new_tokens": max_new_tokens,
             "batch_size": batch_size, "seeds": parse_int_list(seeds, "--seeds") if seeds is not None else None}
    cfg = build_eval_config(overrides, named)
    if not cfg.seeds:
        raise UserError("eval.seeds: give at least one seed (the first one also seeds greedy and exposure-bias passes)")
    configured = cfg.metrics if "metrics" in cfg.model_fields_set else None  # given as an eval.metrics override
    metric_names = parse_metrics(metrics, configured, teacher is not None)
    cfg = cfg.model_copy(update={"metrics": metric_names})
    words = [w.strip() for w in (label_words or "").split(",") if w.strip()]
    if "calibration" in metric_names and len(words) < 2:
        raise UserError("--label-words: the calibration metric needs at least two comma-separated label words")
    if outputs.get("--plot") is not None and "exposure_bias" not in metric_names:
        raise UserError("--plot draws the exposure-bias curve; add exposure_bias to --metrics (needs --teacher)")
    names = ([f"{teacher} (teacher)"] if teacher else []) + list(models)
    for row_name, subset in row_metrics.items():
        if row_name not in models or not set(subset) <= set(metric_names):
            raise UserError(f"row_metrics: {row_name!r}: {subset} must be a subset of {metric_names} for an evaluated model")
    wanted = [baseline] if isinstance(baseline, str) else list(baseline or [])
    baselines = [name for name in (baseline_row(b, names, teacher) for b in wanted) if name is not None]
    check_fail_under(fail_under, metric_names, names, baselines[0] if baselines else None)
    # Outputs: writable files, never an input (the data, a model, the teacher) nor each other.
    inputs = {name: p for name, value in (("--data", data), *((f"model {m}", m) for m in models), ("--teacher", teacher))
              if (p := existing_path(value)) is not None}
    for flag, path in outputs.items():
        if path is not None:
            check_file(flag, path, inputs, stdout=flag == "--json")
    check_distinct(outputs)

    need_refs = [m for m in REFERENCE_METRICS if m in metric_names]
    examples, rows = read_eval_data(data, need_refs)
    examples = data_mod.with_system(examples, cfg.system_prompt)
    if cfg.max_samples is not None:
        examples, rows = examples[: cfg.max_samples], rows[: cfg.max_samples]
    labels = read_labels(rows, examples, words) if "calibration" in metric_names else []
    teacher_spec = resolve_checkpoint(teacher, name=names[0], say=say) if teacher else None
    specs = [resolve_checkpoint(m, say=say) for m in models]
    return EvalRequest(cfg=cfg, metric_names=metric_names, words=words, examples=examples, labels=labels,
                       teacher_spec=teacher_spec, specs=specs, baselines=baselines, row_metrics=row_metrics,
                       fail_under=fail_under)
