"""Atomic, self-describing checkpoints (layout in docs/LAYOUT.md).

A step directory is written under a temporary name, every file fsync'ed, then renamed into place;
`latest` is replaced atomically afterwards. A crash at any point leaves the previous checkpoint and
`latest` intact. Resume state is stored without pickle: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import torch

STEP_PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def rank_state_name(rank: int) -> str:
    """File of one process's resume state in a step dir: rank 0 keeps the single-process name."""
    return "state.safetensors" if rank == 0 else f"state-rank{rank}.safetensors"


def _staged_state(run_dir: Path, step: int, rank: int) -> Path:
    # A `.tmp-step-*` name: a crash leaves it to `prune_steps`, like a half-written step dir.
    return run_dir / f".tmp-{step_name(step)}-rank{rank}" / rank_state_name(rank)


def stage_rank_state(run_dir: Path, step: int, rank: int, tensors: dict[str, "torch.Tensor"],
                     method_state: dict[str, Any]) -> Path:
    """Write the resume state of process `rank` > 0 next to the run, for the main process to move
    into the step dir it assembles (`save_checkpoint(..., world_size=...)`).

    Args:
        tensors: this rank's RNG states and method tensors (rollout buffer).
        method_state: this rank's JSON method state (e.g. its PPO schedule), kept in the file's
            metadata; rank 0's is in trainer_state.json.
    """
    from safetensors.torch import save_file

    path = _staged_state(run_dir, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"method": json.dumps(method_state)})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"rank {rank}: could not write its resume state {path}: {e.strerror or e}") from None
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Split `optimizer.state_dict()` into flat tensors `opt.<param>.<key>` and a JSON part."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("opt."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    recipe_text: str,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
    state_tensors: dict[str, "torch.Tensor"],
    keep_last: int,
    world_size: int = 1,
    model_state_dict: dict[str, "torch.Tensor"] | None = None,
) -> Path:
    """Write `run_dir/step-NNNNNN` atomically, point `latest` at it and prune old steps.

    Args:
        model: the (unwrapped) HF model, or a peft model (its adapter is saved).
        trainer_state: JSON-serialisable loop state (step, data position, counters...).
        state_tensors: tensors needed to resume (optimizer state, RNG states, rollout buffer) of
            the main process (rank 0).
        world_size: processes of the run; ranks 1.. have staged their own resume state with
            `stage_rank_state`, and those files are moved into the step dir before it appears.
        model_state_dict: full weights gathered from a sharded model (FSDP / ZeRO-3); None saves
            `model`'s own.
    """
    from safetensors.torch import save_file

    final = run_dir / step_name(step)
    tmp = run_dir / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        if model_state_dict is not None:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state_dict)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in state_tensors.items()}, str(tmp / rank_state_name(0)))
        for rank in range(1, world_size):
            staged = _staged_state(run_dir, step, rank)
            os.replace(staged, tmp / staged.name)
            staged.parent.rmdir()
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        write_text_atomic(run_dir / "latest", final.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_step_dir(run_dir)
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else ""
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while saving checkpoint {final}{kept}") from None
        raise UserError(f"could not save checkpoint {final}: {e.strerror or e}{kept}") from None
    prune_steps(run_dir, keep_last)
    return final


def list_steps(run_dir: Path) -> list[Path]:
    """Complete step directories, oldest first (temporary ones are never listed)."""
    if not run_dir.is_dir():
        return []
    steps = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "meta.json").exists()]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_step_dir(run_dir: Path) -> Path | None:
    """The step named by `latest`, falling back to the newest complete step dir."""
    pointer = run_dir / "latest"
    if pointer.is_file():
        candidate = run_dir / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "meta.json").exists():
            return candidate
    steps = list_steps(run_dir)
    return steps[-1] if steps else None


def prune_steps(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step dirs (never the one `latest` names) and stale temps."""
    keep = latest_step_dir(run_dir)
    for p in list_steps(run_dir)[:-keep_last]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".tmp-step-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_resume_state(step_dir: Path, rank: int = 0, world_size: int = 1) -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
    """Read trainer_state.json and the resume tensors of process `rank` of a step dir.

    For a rank > 0 the method state of trainer_state.json is replaced by its own (file metadata), and
    if its file holds no optimizer state (data parallel: the optimizer state is the same on every
    rank, so only rank 0 saves it) rank 0's `opt.*` tensors are added.

    Raises:
        UserError: unreadable files, or a checkpoint saved by a different number of processes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        trainer_state = json.loads((step_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot resume from {step_dir}: resume state unreadable ({e})") from None
    saved_world = int(trainer_state.get("world_size", 1))
    if saved_world != world_size:
        raise UserError(f"cannot resume from {step_dir} with {world_size} process(es): it was saved by {saved_world} "
                        f"(each process's sampling RNG and rollout buffer are in its own file); "
                        f"resume with --num-processes {saved_world}")
    try:
        tensors = load_file(str(step_dir / rank_state_name(rank)))
        if rank > 0:
            with safe_open(str(step_dir / rank_state_name(rank)), framework="pt") as f:
                trainer_state["method"] = json.loads((f.metadata() or {}).get("method", "{}"))
        if rank > 0 and not any(k.startswith("opt.") for k in tensors):
            with safe_open(str(step_dir / rank_state_name(0)), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("opt.")})
    except OSError as e:
        raise UserError(f"cannot resume from {step_dir}: resume state of rank {rank} unreadable ({e})") from None
    return trainer_state, tensors
