"""`--fail-under`: thresholds on a report's mean values, or on the lower end of the interval of a
row's difference to the baseline (`METRIC@baseline=VALUE`)."""

from __future__ import annotations

import math

from minillm_cli.errors import UserError
from minillm_cli.evaluate.report import EvalReport, fmt, fmt_diff

BASELINE_SUFFIX = "@baseline"
"""`--fail-under METRIC@baseline=V`: gate on the difference to the baseline instead of the value."""


def parse_spec(spec: str) -> tuple[str | None, str, float]:
    """"[MODEL:]METRIC=VALUE" -> (model or None, metric, value)."""
    left, eq, value_text = spec.rpartition("=")
    # rpartition on ":" so a model name may itself contain ":" (metric names never do)
    model, colon, metric = left.rpartition(":")
    try:
        value = float(value_text)
    except ValueError:
        value = math.nan
    if not eq or not metric.strip() or (colon and not model.strip()) or not math.isfinite(value):
        raise UserError(f"bad --fail-under spec {spec!r}: expected METRIC=NUMBER or MODEL:METRIC=NUMBER")
    return (model.strip() if colon else None), metric.strip(), value


def check_thresholds(report: EvalReport, specs: list[str]) -> list[str]:
    """Check `--fail-under` specs against the report's mean values, or against the differences to
    the baseline.

    A spec "rougeL=20" applies to every model row; "student-run:rougeL=20" to the named row only.
    A model fails a spec when its mean is below the value (or NaN, or the metric was not measured
    for it). "Under" is literal also for lower-is-better metrics such as ECE or loss.

    "rougeL@baseline=0" (needs a comparison, i.e. `--baseline`) applies to every compared row
    ("MODEL:rougeL@baseline=0" to one): a row fails when the LOWER end of the interval of its
    difference to the baseline is below the value, i.e. unless it is better than the baseline by at
    least the value with the interval's confidence (for a lower-is-better metric, a negative value
    bounds how much worse it may be: "loss@baseline=-0.05").

    Args:
        report: The evaluated report.
        specs: The raw `--fail-under` strings.

    Returns:
        One human-readable line per failure; an empty list means every threshold passed.

    Raises:
        UserError: On a malformed spec, an unknown metric (naming the available ones), an unknown
            model name (naming the available ones), or an @baseline spec without a comparison or
            naming the baseline itself. (A row without a paired difference for the metric fails.)
    """
    available = report.metric_names()
    failures = []
    for spec in specs:
        model, metric, threshold = parse_spec(spec)
        if metric.endswith(BASELINE_SUFFIX):
            failures += _check_difference(report, spec, model, metric.removesuffix(BASELINE_SUFFIX), threshold)
            continue
        if metric not in available:
            raise UserError(
                f"--fail-under {spec!r}: unknown metric {metric!r}; available: {', '.join(available) or 'none'}"
            )
        rows = report.rows
        if model is not None:
            rows = [row for row in report.rows if row.name == model]
            if not rows:
                names = ", ".join(row.name for row in report.rows)
                raise UserError(f"--fail-under {spec!r}: unknown model {model!r}; available: {names}")
        for row in rows:
            if metric not in row.metrics:
                failures.append(f"{row.name}: {metric} was not measured (--fail-under {spec})")
                continue
            mean = row.metrics[metric][0]
            if mean is None or not mean >= threshold:  # `not >=` also fails NaN
                failures.append(f"{row.name}: {metric} = {fmt(mean)} < {threshold:g} (--fail-under {spec})")
    return failures


def _check_difference(report: EvalReport, spec: str, model: str | None, metric: str, threshold: float) -> list[str]:
    """The failures of one "[MODEL:]METRIC@baseline=VALUE" spec (see `check_thresholds`)."""
    c = report.comparison
    if c is None:
        raise UserError(f"--fail-under {spec!r}: a difference to the baseline needs --baseline NAME")
    available = report.metric_names()
    if metric not in available:
        raise UserError(f"--fail-under {spec!r}: unknown metric {metric!r}; available: {', '.join(available) or 'none'}")
    models = list(c.differences)
    if model is not None:
        if model == c.baseline:
            raise UserError(f"--fail-under {spec!r}: {model!r} is the baseline itself")
        if model not in c.differences:
            raise UserError(f"--fail-under {spec!r}: unknown model {model!r}; compared: {', '.join(models)}")
        models = [model]
    failures = []
    for name in models:
        d = c.differences[name].get(metric)
        if d is None:
            failures.append(f"{name}: {metric} has no paired difference to {c.baseline} (--fail-under {spec})")
        elif not d.low >= threshold:  # `not >=` also fails NaN
            failures.append(f"{name}: {metric} - {c.baseline} = {fmt_diff(d)}, lower end "
                            f"{fmt(d.low)} < {threshold:g} (--fail-under {spec})")
    return failures
