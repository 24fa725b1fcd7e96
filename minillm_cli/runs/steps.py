"""Reading a run directory: its metrics and step metadata, and which step `eval` and `export` use
(`latest`, a step number, or the best by a logged dev metric). Like `rundir`, the only code that
reads run and step directories."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError
from minillm_cli.runs import checkpoint as ckpt

LOWER_IS_BETTER = ("loss", "kl", "ece", "ppl", "perplexity")
"""Words in a metric name that make lower values better (`best:<metric>`)."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a step or model dir (meta.json, config.json); {} if it holds no object.

    Raises:
        UserError: the file is missing or unreadable.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON objects of run_dir/metrics.jsonl (unreadable lines, e.g. a torn last one, skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def step_recipe(step_dir: Path) -> Path | None:
    """The resolved recipe saved with a step, else the one of its run; None if neither exists."""
    return next((p for p in (step_dir / "recipe.yaml", step_dir.parent / "recipe.yaml") if p.is_file()), None)


def pick_step(run_or_step_dir: Path, step: str) -> Path:
    """The step dir `--step` names (`minillm export`).

    Args:
        run_or_step_dir: A run dir, or a step dir (one with `meta.json`), which is used as is.
        step: `latest`, `best:<metric>` (lower is better for loss/kl/ece/ppl metrics, else higher)
            or a step number.

    Raises:
        UserError: missing dir, no complete step, unknown step number or metric.
    """
    path = Path(run_or_step_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or step directory")
    if (path / "meta.json").is_file():
        return path
    steps = ckpt.list_steps(path)
    if not steps:
        raise UserError(f"{path}: no complete step directory (no {ckpt.STEP_PREFIX}* with meta.json); nothing to export")
    if step == "latest":
        return ckpt.latest_step_dir(path) or steps[-1]
    if step.startswith("best:"):
        return _best_step(path, steps, step[len("best:") :])
    if step.isdigit():
        candidate = path / ckpt.step_name(int(step))
        if candidate in steps:
            return candidate
        have = ", ".join(str(int(p.name[len(ckpt.STEP_PREFIX) :])) for p in steps)
        raise UserError(f"--step {step}: {path} has no complete step {step} (have: {have})")
    raise UserError(f"--step: must be latest, best:<metric> or a step number, got {step!r}")


def _lower_is_better(metric: str) -> bool:
    """Loss-like metrics (loss, kl, ece, perplexity) improve downwards, the rest (rouge, acc) upwards."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(word in leaf for word in LOWER_IS_BETTER)


def _best_step(run_dir: Path, steps: list[Path], metric: str) -> Path:
    """The complete step with the best value of `metric` in metrics.jsonl (or the steps' meta.json)."""
    if not metric:
        raise UserError("--step best:<metric>: name a metric, e.g. best:dev/rougeL")
    by_step = {int(p.name[len(ckpt.STEP_PREFIX) :]): p for p in steps}
    values: dict[int, float] = {}
    seen_keys: set[str] = set()
    for row in read_metrics(run_dir):
        seen_keys.update(k for k in row if k.startswith("dev/"))
        step, value = row.get("step"), row.get(metric)
        if step in by_step and isinstance(value, (int, float)) and math.isfinite(value):
            values[step] = float(value)  # a later line for the same step wins
    for step, path in by_step.items():
        if step not in values:
            dev = read_json(path / "meta.json").get("dev_metrics") or {}
            seen_keys.update(dev)
            value = dev.get(metric, dev.get(metric.removeprefix("dev/")))
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[step] = float(value)
    if not values:
        known = ", ".join(sorted(seen_keys)) or "none"
        raise UserError(f"--step best:{metric}: no saved step of {run_dir} has a value for {metric} (dev metrics seen: {known})")
    sign = 1.0 if _lower_is_better(metric) else -1.0
    # ties go to the later step (trained longer for the same score)
    best = min(values, key=lambda s: (sign * values[s], -s))
    return by_step[best]


def model_step(path: Path, shown: str) -> Path:
    """What a model argument (`minillm eval MODEL`) names on disk: a run dir (a `latest` pointer or a
    complete step, no model files of its own) becomes its latest complete step; any other path is
    returned unchanged.

    Raises:
        UserError: a run dir without a complete checkpoint (`shown` is the argument as typed).
    """
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    if not ((path / "latest").is_file() or ckpt.list_steps(path)):
        return path
    step = ckpt.latest_step_dir(path)
    if step is None:
        raise UserError(f"{shown}: run directory without a complete checkpoint (no step-NNNNNN with meta.json)")
    return step


def lora_base(step_dir: Path) -> str | None:
    """The base model a LoRA step was trained on, as recorded: meta.json `base_model`, else the
    adapter config's `base_model_name_or_path`; None when neither names one."""
    base = read_json(step_dir / "meta.json").get("base_model") if (step_dir / "meta.json").is_file() else None
    if not base and (step_dir / "adapter_config.json").is_file():
        base = read_json(step_dir / "adapter_config.json").get("base_model_name_or_path")
    return str(base) if base else None
