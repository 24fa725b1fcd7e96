"""Is a resume the run it claims to be? The recipe asked for now against the checkpoint's, and the
data files' hashes against those recorded when the run started (README, "What minillm promises")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from minillm_cli.config.schema import DataConfig, Recipe
from minillm_cli.errors import UserError

RESUME_SAFE = frozenset({
    "output.dir", "output.overwrite",
    "train.log_every", "train.save_every", "train.keep_last", "train.dev_loss_every", "train.threads",
    "train.report_to",
})
"""Recipe keys that may change on `--resume` without changing what is trained: logging and saving
cadence, the teacher-forced dev loss (no RNG), CPU threads (float summation order only), trackers."""
_PATH_KEYS = ("data.train", "data.dev", "data.corpus", "data.teacher_cache", "models.teacher", "models.student")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _same_path(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    return a == b or os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def file_sha256(path: str | Path) -> str:
    """Content hash of a data file (provenance in checkpoints, resume checks and reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_hashes(data: DataConfig) -> dict[str, str | None]:
    """sha256 of the run's local data files (train, dev, corpus); None for hub datasets / unset."""
    out: dict[str, str | None] = {}
    for key in ("train", "dev", "corpus"):
        value = getattr(data, key)
        out[key] = file_sha256(value) if value and Path(value).expanduser().is_file() else None
    return out


def check_resume(saved: Recipe, new: Recipe, step_meta: dict[str, Any], now: dict[str, str | None], *,
                 extend: bool) -> dict[str, int] | None:
    """Refuse a resume whose recipe or data would make it another run than the one it continues.

    Args:
        saved, new: the `Recipe` the checkpoint was trained with, and the one asked for now.
        step_meta: the checkpoint's meta.json (data hashes, earlier extensions).
        now: `data_hashes(new.data)`, computed once by the caller (it also goes into meta.json).
        extend: `--extend`: allow a larger `train.max_steps` when the schedule does not depend on it.

    Returns:
        None, or the extension record {"from", "to"} when `train.max_steps` grows under `extend`.

    Raises:
        UserError: naming every differing key (saved → new), or the data file whose content changed.
    """
    a = _flat(saved.model_dump(mode="json", by_alias=True))
    b = _flat(new.model_dump(mode="json", by_alias=True))
    keys = sorted(set(a) | set(b))
    changed = [k for k in keys if k not in RESUME_SAFE
               and not (_same_path(a.get(k), b.get(k)) if k in _PATH_KEYS else a.get(k) == b.get(k))]
    extension = None
    if "train.max_steps" in changed and extend:
        old, to = int(a["train.max_steps"]), int(b["train.max_steps"])
        o = new.optim
        if to <= old:
            raise UserError(f"--extend: train.max_steps must grow (the run has {old}, got {to})")
        if o.schedule != "constant" or o.warmup_steps > old - 1:
            why = ("the cosine schedule is stretched over max_steps" if o.schedule != "constant"
                   else f"the warm-up ({o.warmup_steps} steps) is clipped to max_steps")
            raise UserError(f"--extend: train.max_steps {old} → {to} would change the learning rate of steps "
                            f"already taken ({why}); only a constant schedule whose warm-up ended can be extended")
        changed.remove("train.max_steps")
        extension = {"from": old, "to": to}
    if changed:
        shown = ", ".join(f"{k} ({_short(a.get(k))} → {_short(b.get(k))})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        hint = (" (--extend allows a larger train.max_steps with a constant schedule)"
                if changed == ["train.max_steps"] else "")
        raise UserError(f"--resume: the recipe differs from the run's: {shown}{more}; resuming would not continue "
                        f"the same run: drop these changes, or start a new run with another -o{hint}")
    saved_hashes = (step_meta.get("data") or {})
    for key in ("train", "dev", "corpus"):
        before = saved_hashes.get("sha256") if key == "train" else saved_hashes.get(f"{key}_sha256")
        after = now[key]
        if before and after and before != after:
            raise UserError(f"--resume: data.{key} {getattr(new.data, key)} changed since the run started "
                            f"(sha256 {before[:12]}… → {after[:12]}…); resume with the same file")
    return extension


def check_checkpoint(recipe: Recipe, resume_dir: Path, hashes: dict[str, str | None],
                     extend: bool) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Compare the recipe asked for now with the checkpoint's saved recipe and meta.json (`check_resume`).

    Returns the new extension record (or None) and the run's earlier ones, from the step's meta.json.

    Raises:
        UserError: the saved recipe is unusable, or `check_resume` refuses.
    """
    from minillm_cli.config.loading import read_recipe_file
    from minillm_cli.config.validation import validate

    try:
        saved = validate(read_recipe_file(resume_dir / "recipe.yaml"))
        meta = json.loads((resume_dir / "meta.json").read_text(encoding="utf-8"))
    except UserError as e:
        raise UserError(f"--resume: the saved recipe of {resume_dir} is unusable ({e})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {resume_dir / 'meta.json'} is unreadable ({e})") from None
    extension = check_resume(saved, recipe, meta, hashes, extend=extend)
    return extension, list(meta.get("extended", []))
