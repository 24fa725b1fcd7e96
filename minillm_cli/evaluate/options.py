"""Options of `minillm eval`, checked before any model is loaded: the metric list and the report
columns each metric produces, `--seeds`, `--set` overrides, `--baseline`, `--fail-under` and the
output paths (see `evaluate.command` for the protocol)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from minillm_cli.config import EvalConfig
from minillm_cli.errors import UserError
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate import thresholds
from minillm_cli.recipe_loading import parse_override

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
