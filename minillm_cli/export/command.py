"""`minillm export`: one step of a run, exported, verified, then published atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError
from minillm_cli.export.card import is_export, model_card
from minillm_cli.export.gguf import write_gguf
from minillm_cli.export.hf import write_adapter, write_hf
from minillm_cli.export.options import ExportOptions, ExportResult, check_options
from minillm_cli.export.verify import load_source, prompt_ids, tolerance_for, verify
from minillm_cli.progress import Phase
from minillm_cli.runs import steps


def export(run_or_step_dir: Path, opts: ExportOptions, console: Any = None) -> ExportResult:
    """Export a step of a run to `opts.out`, verified, never clobbering anything by surprise.

    Args:
        run_or_step_dir: A run dir (the step is chosen by `opts.step`) or a step dir.
        opts: Format, dtype, sharding, LoRA handling, output dir and verification.

    Returns:
        The export's location, files and the measured logit difference.

    Raises:
        UserError: bad options, an existing non-empty `out` without `overwrite`, an unsupported
            model for GGUF, a missing LoRA base, or a verification that failed (nothing is left at
            `out` then).
    """
    import torch

    check_options(opts)
    step_dir = steps.pick_step(Path(run_or_step_dir), opts.step)
    out = Path(opts.out)
    _check_out(out, step_dir, opts.overwrite)
    meta = steps.read_json(step_dir / "meta.json")
    is_lora = bool(meta.get("lora")) or (step_dir / "adapter_config.json").is_file()
    if is_lora and not opts.merge_lora and (opts.format != "safetensors" or opts.dtype is not None):
        raise UserError("--no-merge keeps the LoRA adapter as trained: it cannot be combined with --format gguf or --dtype")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source, tokenizer, source_dtype = load_source(step_dir, is_lora)
        ids = prompt_ids(tokenizer)
        with torch.no_grad():
            reference = source(input_ids=ids).logits.float()  # (1, T, V)
        if is_lora and opts.merge_lora:
            source = source.merge_and_unload()  # reference came from the unmerged adapter
        target_dtype = opts.dtype or source_dtype
        if opts.format == "gguf":
            write_gguf(source, tokenizer, tmp / f"model-{opts.gguf_type}.gguf", opts.gguf_type)
        elif is_lora and not opts.merge_lora:
            write_adapter(step_dir, tokenizer, tmp)
        else:
            write_hf(source, tokenizer, step_dir, tmp, target_dtype, opts.shard_size)
        del source  # free the source weights before loading the export
        tolerance = tolerance_for(opts, source_dtype, target_dtype, merged=is_lora and opts.merge_lora, reference=reference)
        (tmp / "README.md").write_text(
            model_card(step_dir, meta, opts, target_dtype, is_lora=is_lora, files=_list_files(tmp)), encoding="utf-8"
        )
        diff = float("nan")
        if opts.verify:  # reloads the export and runs it: minutes for a large model
            say = (lambda m: console.print(m, highlight=False, markup=False)) if console is not None else None
            with Phase(f"export: verifying {out.name} against its source", None, "", console, say):
                diff = verify(tmp, opts, step_dir, ids, reference, tolerance)
        files = _list_files(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        out=out,
        step_dir=step_dir,
        files=files,
        max_abs_logit_diff=diff,
        tolerance=tolerance if opts.verify else float("nan"),
    )


def _check_out(out: Path, step_dir: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber data: a file, a non-empty dir (without overwrite), the source."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    source = step_dir.resolve()
    target = out.resolve()
    if target == source or target in source.parents:
        raise UserError(f"--out {out}: contains the step being exported ({step_dir}); choose another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
        if not is_export(out):
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
            shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
            raise UserError(f"--overwrite: {out} is not an earlier minillm export (it holds {shown}); refusing to "
                            "delete it: choose another --out")
        if Path.cwd().resolve() == target or target in Path.cwd().resolve().parents:
            raise UserError(f"--overwrite: refusing to delete {out}: it contains the current directory")


def _list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out` (same filesystem, so each rename is atomic).

    An existing `out` (empty, or non-empty with --overwrite, checked earlier) is first renamed aside
    and deleted only once the new one is in place, so a crash never leaves neither.
    """
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    old = out.parent / f".{out.name}.old-export-{os.getpid()}"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists():
            os.rename(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
