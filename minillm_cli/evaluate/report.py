"""One evaluation report, rendered as a rich table, as JSON and as an exposure-bias plot, plus the
`--fail-under` threshold check."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from minillm_cli.errors import UserError

# Key in `ModelRow.curves` of the dict returned by `metrics.exposure_bias_curve`.
EXPOSURE_BIAS = "exposure_bias"

SPLITS = ("test", "dev")
_SPLIT_NOTE = {
    "test": "test split, held-out",
    "dev": "dev split, logged in training",
}


@dataclass
class ModelRow:
    """One evaluated model.

    Attributes:
        name: A display name (run dir, checkpoint or model id).
        metrics: Metric name -> (mean over seeds, sample std over seeds or None for one seed).
        curves: Curve name -> curve dict, e.g. `curves["exposure_bias"]` from `exposure_bias_curve`.
    """

    name: str
    metrics: dict[str, tuple[float, float | None]]
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """Everything one `minillm eval` call measured.

    Attributes:
        settings: Decoding settings, seeds, data path, metrics asked for: anything that makes the
            numbers reproducible; must be JSON-able after `to_json`'s conversion.
        rows: One row per model, in display order.
        split: "test" (held-out set evaluated by `eval`) or "dev" (numbers logged during training).
    """

    settings: dict[str, Any]
    rows: list[ModelRow]
    split: str = "test"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def metric_names(self) -> list[str]:
        """Every metric measured for some row, in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row.metrics))
        return list(names)


def _decimals(value: float) -> int:
    """Two decimals for percentages and other numbers >= 1, four for fractions such as ECE."""
    return 2 if abs(value) >= 1 else 4


def _fmt(value: float | None, decimals: int | None = None) -> str:
    """A number for display; `decimals` defaults to `_decimals(value)`."""
    if value is None:  # a NaN that went through JSON
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{_decimals(value) if decimals is None else decimals}f}"


def _fmt_cell(mean: float | None, std: float | None) -> str:
    """"mean ± std" (both with the mean's number of decimals) or a bare mean."""
    if std is None:
        return _fmt(mean)
    decimals = _decimals(mean) if mean is not None and math.isfinite(mean) else None
    return f"{_fmt(mean)} ± {_fmt(std, decimals)}"


def render_table(report: EvalReport) -> Table:
    """A rich table with one row per model and one column per metric.

    Cells read "mean ± std" when a std is known, a bare mean otherwise, and "-" for a metric the
    model was not measured on. The title says which split the numbers come from.
    """
    names = report.metric_names()
    title = f"Evaluation ({_SPLIT_NOTE[report.split]})"
    # min_width keeps a narrow table (one metric) from wrapping its title
    table = Table(title=title, min_width=len(title) + 2)
    table.add_column("model", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    for row in report.rows:
        cells = [_fmt_cell(*row.metrics[name]) if name in row.metrics else "-" for name in names]
        table.add_row(row.name, *cells)
    return table


def _plain(obj: Any) -> Any:
    """Turn numpy numbers/arrays, tuples and paths into JSON types; NaN and infinities become None."""
    if isinstance(obj, dict):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)  # Path and anything else: its readable form


def to_json(report: EvalReport) -> dict[str, Any]:
    """Every number and setting of the report as a JSON-serialisable dict.

    Layout: {"split", "settings", "models": [{"name", "metrics": {metric: {"mean", "std"}},
    "curves"}]}. Non-finite numbers (e.g. ExAccErr where E(l) = 0) are written as null.
    """
    models = [
        {
            "name": row.name,
            "metrics": {name: {"mean": mean, "std": std} for name, (mean, std) in row.metrics.items()},
            "curves": row.curves,
        }
        for row in report.rows
    ]
    return _plain({"split": report.split, "settings": report.settings, "models": models})


def from_json(data: dict[str, Any]) -> EvalReport:
    """Rebuild a report from `to_json`'s dict (nulls stay None; tuples come back as tuples).

    Raises:
        UserError: If the dict lacks a field of the layout `to_json` writes.
    """
    try:
        rows = [
            ModelRow(
                name=model["name"],
                metrics={name: (m["mean"], m["std"]) for name, m in model["metrics"].items()},
                curves=model.get("curves", {}),
            )
            for model in data["models"]
        ]
        return EvalReport(settings=data["settings"], rows=rows, split=data["split"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UserError(f"not an evaluation report (bad or missing field {exc})") from exc


def write_json(report: EvalReport, path: str | Path) -> None:
    """Write `to_json(report)` to `path` (parents created), indented, strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def plot_exposure_bias(report: EvalReport, path: str | Path) -> None:
    """Plot ExAccErr(l) against response length l, one line per model, to a PNG at `path`.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).

    Raises:
        UserError: If matplotlib is not installed, or no model has an exposure-bias curve.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UserError("plotting needs matplotlib: pip install minillm[plot]") from exc
    rows = [row for row in report.rows if EXPOSURE_BIAS in row.curves]
    if not rows:
        raise UserError(f"no model in the report has an '{EXPOSURE_BIAS}' curve to plot")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        curve = row.curves[EXPOSURE_BIAS]
        # None (from JSON) or NaN where E(l) = 0: matplotlib leaves a gap at NaN
        ys = [math.nan if y is None else y for y in curve["exaccerr"]]
        ax.plot(curve["lengths"], ys, label=row.name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("response length l")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title(f"Exposure bias ({report.split} split)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def _parse_spec(spec: str) -> tuple[str | None, str, float]:
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
    """Check `--fail-under` specs against the report's mean values.

    A spec "rougeL=20" applies to every model row; "student-run:rougeL=20" to the named row only.
    A model fails a spec when its mean is below the value (or NaN, or the metric was not measured
    for it). "Under" is literal also for lower-is-better metrics such as ECE or loss.

    Args:
        report: The evaluated report.
        specs: The raw `--fail-under` strings.

    Returns:
        One human-readable line per failure; an empty list means every threshold passed.

    Raises:
        UserError: On a malformed spec, an unknown metric (naming the available ones) or an unknown
            model name (naming the available ones).
    """
    available = report.metric_names()
    failures = []
    for spec in specs:
        model, metric, threshold = _parse_spec(spec)
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
                failures.append(f"{row.name}: {metric} = {_fmt(mean)} < {threshold:g} (--fail-under {spec})")
    return failures
