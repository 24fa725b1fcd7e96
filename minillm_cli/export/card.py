"""The model card `README.md` of an export: where the model came from and how it was exported.
Its first sentence marks a directory as a minillm export (`is_export`), which --overwrite may replace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minillm_cli import __version__
from minillm_cli.export.options import ExportOptions
from minillm_cli.runs import steps

CARD_SIGNATURE = "A student distilled with minillm"


def is_export(path: Path) -> bool:
    """An export written by minillm: its model card says so (see `model_card`)."""
    try:
        return CARD_SIGNATURE in (path / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _dev_metrics(step_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Dev metrics of this step: meta.json's, else the last dev eval in metrics.jsonl up to this step."""
    if meta.get("dev_metrics"):
        return dict(meta["dev_metrics"])
    step = meta.get("step")
    found: dict[str, Any] = {}
    for row in steps.read_metrics(step_dir.parent):
        dev = {k: v for k, v in row.items() if k.startswith("dev/")}
        if dev and (step is None or not isinstance(row.get("step"), int) or row["step"] <= step):
            found = dev
    return found


def _read_recipe(step_dir: Path) -> dict[str, Any]:
    """The resolved recipe saved with the step (or the run), as a dict; {} if absent or unreadable."""
    import yaml

    path = steps.step_recipe(step_dir)
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    if value is None or value == "" or value == {}:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def model_card(step_dir: Path, meta: dict[str, Any], opts: ExportOptions, dtype: str, is_lora: bool, files: list[str]) -> str:
    """README.md: where the model came from (teacher, init, method settings, data hash, steps, dev
    metrics, tool version) and how it was exported."""
    import yaml

    recipe = _read_recipe(step_dir)
    method: dict[str, Any] = recipe["method"] if isinstance(recipe.get("method"), dict) else {"name": meta.get("method")}
    data: dict[str, Any] = meta["data"] if isinstance(meta.get("data"), dict) else {}
    recipe_data: dict[str, Any] = recipe["data"] if isinstance(recipe.get("data"), dict) else {}
    method_name = meta.get("method") or method.get("name") or "unknown"
    if opts.format == "gguf":
        fmt = f"gguf ({opts.gguf_type})"
    elif is_lora and not opts.merge_lora:
        fmt = "LoRA adapter (safetensors, not merged)"
    else:
        fmt = f"safetensors ({dtype})" + (", LoRA merged into the base" if is_lora else "")
    rows = [
        ("Teacher", meta.get("teacher")),
        ("Student", meta.get("student")),
        ("Student init", meta.get("student_init")),
        ("Method", method_name),
        ("Data", data.get("path") or recipe_data.get("path")),
        ("Data sha256", data.get("sha256")),
        ("Steps", meta.get("step")),
        ("LoRA base model", meta.get("base_model") if is_lora else None),
        ("Source checkpoint", str(step_dir)),
        ("Export format", fmt),
        ("minillm version", f"{__version__} (trained with {meta.get('minillm_version', '?')})"),
    ]
    dev = _dev_metrics(step_dir, meta)
    tags = list(dict.fromkeys(["minillm", "distillation", str(method_name)]))  # no duplicate for method minillm
    front = {"library_name": "peft" if is_lora and not opts.merge_lora else "transformers", "tags": tags}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {opts.out.name}", ""]
    lines += [f"{CARD_SIGNATURE} ({method_name}) from {_fmt(meta.get('teacher'))}.", ""]
    lines += ["## Provenance", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    lines += ["", "## Method settings", "", "```yaml", yaml.safe_dump({"method": method}, sort_keys=False).strip(), "```", ""]
    lines += ["## Final dev metrics", ""]
    if dev:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(dev.items())]
    else:
        lines += ["No dev evaluation was recorded for this step."]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    gguf_file = next((f for f in files if f.endswith(".gguf")), None)
    if gguf_file:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{opts.out.name}", gguf_file="{gguf_file}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}", gguf_file="{gguf_file}")']
    elif is_lora and not opts.merge_lora:
        lines += ["from peft import PeftModel", ""]
        lines += [f'base = AutoModelForCausalLM.from_pretrained("{meta.get("base_model")}")']
        lines += [f'model = PeftModel.from_pretrained(base, "{opts.out.name}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}")']
    else:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{opts.out.name}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{opts.out.name}")']
    lines += ["```", ""]
    return "\n".join(lines)
