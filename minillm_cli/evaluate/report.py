"""One evaluation report, rendered as a rich table, as JSON and as an exposure-bias plot, plus the
paired comparison with a baseline (`--baseline`); the `--fail-under` check is `evaluate.thresholds`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from minillm_cli.errors import UserError
from minillm_cli.evaluate.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PairedDifference, paired_bootstrap

# Key in `ModelRow.curves` of the dict returned by `metrics.exposure_bias_curve`.
EXPOSURE_BIAS = "exposure_bias"

SPLITS = ("test", "dev")
_SPLIT_NOTE = {
    "test": "test split, held-out",
    "dev": "dev split, logged in training",
}


@dataclass
class PerPrompt:
    """One metric of one model per seed and prompt: what a paired comparison resamples.

    The reported mean is `mean_s Σ_i values[s, i] / Σ_i weights[s, i]` (weights None: 1 per prompt,
    i.e. the mean over prompts), see `metrics.paired_bootstrap`.

    Attributes:
        index: (N,) example index of every column (prompts are matched across models by it).
        values: (S, N) per seed and prompt, the metric, or its sum over tokens for a token mean.
        weights: (S, N) the token counts of a token mean, or None.
    """

    index: list[int]
    values: np.ndarray
    weights: np.ndarray | None = None

    def take(self, index: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, weights) restricted to the examples `index`, in that order."""
        col = {ex: i for i, ex in enumerate(self.index)}
        cols = [col[ex] for ex in index]
        return self.values[:, cols], (None if self.weights is None else self.weights[:, cols])


@dataclass
class ModelRow:
    """One evaluated model.

    Attributes:
        name: A display name (run dir, checkpoint or model id).
        metrics: Metric name -> (mean over seeds, sample std over seeds or None for one seed).
        curves: Curve name -> curve dict, e.g. `curves["exposure_bias"]` from `exposure_bias_curve`.
        per_prompt: Metric name -> its per-seed, per-prompt values (for `compare`; not written to JSON).
    """

    name: str
    metrics: dict[str, tuple[float, float | None]]
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_prompt: dict[str, PerPrompt] = field(default_factory=dict, repr=False)


@dataclass
class Comparison:
    """Every other model's difference to a baseline row, per metric, with paired bootstrap intervals.

    Attributes:
        baseline: Name of the baseline row.
        differences: Model name -> metric -> `PairedDifference` (metrics measured per prompt on both).
        resamples, confidence, seed: The bootstrap's settings (the resampling is reproducible).
    """

    baseline: str
    differences: dict[str, dict[str, PairedDifference]]
    resamples: int = BOOTSTRAP_RESAMPLES
    confidence: float = 0.95
    seed: int = BOOTSTRAP_SEED


@dataclass
class EvalReport:
    """Everything one `minillm eval` call measured.

    Attributes:
        settings: Decoding settings, seeds, data path, metrics asked for: anything that makes the
            numbers reproducible; must be JSON-able after `to_json`'s conversion.
        rows: One row per model, in display order.
        split: "test" (held-out set evaluated by `eval`) or "dev" (numbers logged during training).
        comparison: Differences to a baseline row, or None.
        more_comparisons: Differences to further baseline rows (one evaluation, several paired
            comparisons, e.g. the quickstart's distilled student against its warm-up and against an
            equal-budget SFT control); `--fail-under ...@baseline` uses `comparison` only.
    """

    settings: dict[str, Any]
    rows: list[ModelRow]
    split: str = "test"
    comparison: Comparison | None = None
    """Differences to a baseline row (`compare`), or None."""
    more_comparisons: list[Comparison] = field(default_factory=list)
    """Differences to further baseline rows (`compare`), after `comparison`."""

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


def fmt(value: float | None, decimals: int | None = None) -> str:
    """A number for display; `decimals` defaults to `_decimals(value)`."""
    if value is None:  # a NaN that went through JSON
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{_decimals(value) if decimals is None else decimals}f}"


def _fmt_cell(mean: float | None, std: float | None) -> str:
    """"mean ± std" (both with the mean's number of decimals) or a bare mean."""
    if std is None:
        return fmt(mean)
    decimals = _decimals(mean) if mean is not None and math.isfinite(mean) else None
    return f"{fmt(mean)} ± {fmt(std, decimals)}"


def compare(rows: list[ModelRow], baseline: str, *, resamples: int = BOOTSTRAP_RESAMPLES,
            confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Paired differences of every row to the row named `baseline` (`metrics.paired_bootstrap`).

    A metric is compared when both rows have its per-prompt values with the same number of seeds;
    prompts are matched by example index (those both rows were measured on). Metrics that are not
    a mean over prompts (dist4, ece, exaccerr@L) have no per-prompt values and are left out.

    Raises:
        UserError: No row is named `baseline`.
    """
    base = next((row for row in rows if row.name == baseline), None)
    if base is None:
        raise UserError(f"--baseline {baseline!r}: no such model; available: {', '.join(r.name for r in rows)}")
    differences: dict[str, dict[str, PairedDifference]] = {}
    for row in rows:
        if row is base:
            continue
        diffs: dict[str, PairedDifference] = {}
        for metric, mine in row.per_prompt.items():
            theirs = base.per_prompt.get(metric)
            if theirs is None or theirs.values.shape[0] != mine.values.shape[0]:
                continue
            theirs_index = set(theirs.index)
            shared = [ex for ex in mine.index if ex in theirs_index]
            if not shared:
                continue
            (a, wa), (b, wb) = mine.take(shared), theirs.take(shared)
            diffs[metric] = paired_bootstrap(a, b, wa, wb, resamples=resamples, confidence=confidence, seed=seed)
        differences[row.name] = diffs
    return Comparison(baseline=baseline, differences=differences, resamples=resamples, confidence=confidence,
                      seed=seed)


def fmt_diff(d: PairedDifference) -> str:
    """"+1.23 [-0.40, +2.90]", plus "within noise" when the interval covers 0."""
    if not (math.isfinite(d.low) and math.isfinite(d.high)):
        return f"{d.diff:+.2f} [n/a]"
    decimals = _decimals(max(abs(d.diff), abs(d.low), abs(d.high)))
    text = f"{d.diff:+.{decimals}f} [{d.low:+.{decimals}f}, {d.high:+.{decimals}f}]"
    return text + (" within noise" if d.within_noise else "")


_STEP_DIR = re.compile(r"step-\d+")
_TEACHER_SUFFIX = " (teacher)"


def short_names(names: list[str]) -> dict[str, str]:
    """The shortest distinguishing name of each model row: the fewest trailing path parts that no
    other row shares (a `step-NNNNNN` directory always keeps its run's name: `kd/step-000048`).

    `runs/ab/kd/step-000048` and `runs/ab/gkd/step-000048` -> `kd/step-000048`, `gkd/step-000048`;
    a teacher row keeps its " (teacher)" mark; a name that is no path is kept whole.
    """
    def parts(name: str) -> list[str]:
        return [p for p in name.removesuffix(_TEACHER_SUFFIX).replace("\\", "/").split("/") if p not in ("", ".")]

    split = {n: parts(n) for n in names}
    out: dict[str, str] = {}
    for name, ps in split.items():
        k = 2 if len(ps) >= 2 and _STEP_DIR.fullmatch(ps[-1]) else 1
        while k < len(ps) and any(o != name and split[o][-k:] == ps[-k:] for o in names):
            k += 1
        short = "/".join(ps[-k:]) if ps else name
        out[name] = short + (_TEACHER_SUFFIX if name.endswith(_TEACHER_SUFFIX) else "")
    return out


def _width(cell: str) -> int:
    """Terminal columns of a cell as rich shows it (markup such as "[green]" takes none)."""
    try:
        return Text.from_markup(cell).cell_len
    except Exception:  # not valid markup: shown as it is
        return len(cell)


def _fold(header: list[str], cells: list[list[str]], width: int | None) -> list[list[int]]:
    """Metric columns (indices into `header`) grouped so that each table fits `width` characters:
    wide tables fold by metric (another table with the same model column), never inside a cell.

    header: the metric column titles; cells: per row, the model name then one cell per metric."""
    if width is None or not header:
        return [list(range(len(header)))]
    col = lambda i: max(_width(header[i]), *(_width(r[i + 1]) for r in cells)) + 3  # noqa: E731  padding + border
    model = max([5, *(_width(r[0]) for r in cells)]) + 3
    groups: list[list[int]] = [[]]
    used = model + 1
    for i in range(len(header)):
        if groups[-1] and used + col(i) > width:
            groups.append([])
            used = model + 1
        groups[-1].append(i)
        used += col(i)
    return groups


def fold_tables(title: str, header: list[str], rows: list[list[str]], width: int | None,
                min_width: int, first: str = "model") -> list[Table]:
    """One table per group of metric columns (`_fold`) that fits `width`, each with the `first`
    column (row names) again; the title goes on the first table."""
    tables = []
    for j, group in enumerate(_fold(header, rows, width)):
        t = Table(title=title if j == 0 else None, min_width=min_width if j == 0 else None)
        t.add_column(first, style="bold")
        for i in group:
            t.add_column(header[i], justify="right")
        for r in rows:
            t.add_row(r[0], *[r[i + 1] for i in group])
        tables.append(t)
    return tables


def render_comparison(report: EvalReport, c: Comparison | None = None, width: int | None = None) -> list[Table]:
    """The differences to the baseline (`c`, default the report's comparison) as tables (none
    without a comparison), folded by metric to fit `width`.

    One row per compared model (shortest distinguishing names), one column per metric of the main
    table; cells read "diff [low, high]" with the paired bootstrap interval, "within noise" when it
    covers 0, and "-" where the metric has no per-prompt values (dist4, ece, exaccerr@L) or was not
    measured on both.
    """
    c = c or report.comparison
    if c is None:
        return []
    names = report.metric_names()
    short = short_names([r.name for r in report.rows])
    prompts = sorted({d.prompts for diffs in c.differences.values() for d in diffs.values()})
    title = (f"Difference to {short.get(c.baseline, c.baseline)}, {c.confidence:.0%} paired bootstrap interval "
             f"({c.resamples} resamples of {'/'.join(map(str, prompts)) or 0} prompts, seeds paired)")
    rows = [[short.get(model, model), *[fmt_diff(diffs[n]) if n in diffs else "-" for n in names]]
            for model, diffs in c.differences.items()]
    # min_width: a narrow table would wrap the title
    return fold_tables(title, [f"Δ {n}" for n in names], rows, width, min(len(title) + 2, width or 120))


def render_table(report: EvalReport, width: int | None = None) -> RenderableType:
    """Rich tables with one row per model and one column per metric (and, when the report has
    comparisons, the tables of differences to each baseline under them: `render_comparison`).

    Rows carry the shortest distinguishing name of each model (`short_names`), with the full paths
    listed once underneath when they differ; with `width` (the terminal's), a table wider than that
    folds by metric into several tables rather than wrapping cells. Cells read "mean ± std" when a
    std is known, a bare mean otherwise, and "-" for a metric the model was not measured on. The
    title says which split the numbers come from.
    """
    names = report.metric_names()
    short = short_names([r.name for r in report.rows])
    title = f"Evaluation ({_SPLIT_NOTE[report.split]})"
    rows = [[short[row.name], *[_fmt_cell(*row.metrics[n]) if n in row.metrics else "-" for n in names]]
            for row in report.rows]
    # min_width keeps a narrow table (one metric) from wrapping its title
    parts: list[RenderableType] = list(fold_tables(title, names, rows, width, len(title) + 2))
    if any(short[n] != n for n in short):
        parts.append(Text("\n".join(f"  {short[n]} = {n}" for n in short if short[n] != n)))
    for comparison in ([report.comparison] if report.comparison else []) + report.more_comparisons:
        parts += render_comparison(report, comparison, width)
    return parts[0] if len(parts) == 1 else Group(*parts)


def exposure_bias_title(report: EvalReport, data_name: str | None = None) -> str:
    """The plot's title: the evaluated data by name when given, else the report's split."""
    return f"Exposure bias ({data_name or f'{report.split} split'})"


def plot_exposure_bias(report: EvalReport, path: str | Path, data_name: str | None = None) -> None:
    """Plot ExAccErr(l) against response length l, one line per model, to a PNG at `path`.

    `data_name` names the evaluated data in the title (default: the report's split).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).

    Raises:
        UserError: If matplotlib is not installed, or no model has an exposure-bias curve.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UserError("plotting needs matplotlib (a dependency of minillm): pip install matplotlib") from exc
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
    ax.set_title(exposure_bias_title(report, data_name))
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
