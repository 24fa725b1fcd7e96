"""An evaluation report as JSON (`minillm eval --json`) and back: what CI pipelines read and what the
quality study reloads. NaN and infinities are written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from minillm_cli.errors import UserError
from minillm_cli.evaluate.metrics import PairedDifference
from minillm_cli.evaluate.report import Comparison, EvalReport, ModelRow


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
    "curves"}]}, plus with a baseline "comparison": {"baseline", "method", "resamples",
    "confidence", "seed", "models": {name: {metric: {"diff", "low", "high", "prompts",
    "within_noise"}}}}; with further baselines (`more_comparisons`) also "comparisons": {baseline:
    the same layout} for every baseline, the first included. Non-finite numbers (e.g. ExAccErr
    where E(l) = 0) are written as null.
    """
    models = [
        {
            "name": row.name,
            "metrics": {name: {"mean": mean, "std": std} for name, (mean, std) in row.metrics.items()},
            "curves": row.curves,
        }
        for row in report.rows
    ]
    out: dict[str, Any] = {"split": report.split, "settings": report.settings, "models": models}
    if report.comparison is not None:
        out["comparison"] = _comparison_json(report.comparison)
        if report.more_comparisons:
            out["comparisons"] = {c.baseline: _comparison_json(c) for c in [report.comparison, *report.more_comparisons]}
    return _plain(out)


def _comparison_json(c: Comparison) -> dict[str, Any]:
    return {
        "baseline": c.baseline,
        "method": "paired bootstrap over prompts (seeds of a prompt kept together), percentile interval",
        "resamples": c.resamples, "confidence": c.confidence, "seed": c.seed,
        "models": {model: {metric: {"diff": d.diff, "low": d.low, "high": d.high, "prompts": d.prompts,
                                    "within_noise": d.within_noise} for metric, d in diffs.items()}
                   for model, diffs in c.differences.items()},
    }


def _comparison_from_json(c: dict[str, Any]) -> Comparison:
    nan = lambda v: math.nan if v is None else v  # noqa: E731  (null = no interval)
    return Comparison(
        baseline=c["baseline"], resamples=c["resamples"], confidence=c["confidence"], seed=c["seed"],
        differences={model: {metric: PairedDifference(diff=d["diff"], low=nan(d["low"]), high=nan(d["high"]),
                                                      prompts=d["prompts"])
                             for metric, d in diffs.items()} for model, diffs in c["models"].items()})


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
        comparison = None if data.get("comparison") is None else _comparison_from_json(data["comparison"])
        more = [_comparison_from_json(c) for name, c in (data.get("comparisons") or {}).items()
                if comparison is None or name != comparison.baseline]
        return EvalReport(settings=data["settings"], rows=rows, split=data["split"], comparison=comparison,
                          more_comparisons=more)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UserError(f"not an evaluation report (bad or missing field {exc})") from exc


def write_json(report: EvalReport, path: str | Path) -> None:
    """Write `to_json(report)` to `path` (parents created), indented, strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
