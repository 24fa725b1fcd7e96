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


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None when its header and length are consistent.

    Reads only the header (8-byte little-endian length, then JSON): a truncated file, a file of
    another format and an empty one are told apart without loading any tensor.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated or empty ({size} bytes; not a safetensors file)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "not a safetensors file, or truncated (its header runs past the end of the file)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file (unreadable header)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "not a safetensors file (malformed header)"
    expected = 8 + n + max(ends, default=0)
    if expected > size:
        return f"truncated ({size} bytes, its header describes {expected})"
    if expected < size:
        return f"corrupt ({size} bytes, its header describes {expected})"
    return None


def check_weights(model_dir: Path) -> None:
    """Raise a UserError naming the first unreadable safetensors file of a model or step directory."""
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            raise UserError(f"{f}: {problem}")


def step_problem(step_dir: Path) -> str | None:
    """Why a step directory cannot be resumed from (a file missing, truncated or unreadable), or None."""
    for name in ("meta.json", "trainer_state.json", "recipe.yaml"):
        try:
            text = (step_dir / name).read_text(encoding="utf-8")
            if name.endswith(".json"):
                json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{name}: unreadable ({getattr(e, 'strerror', None) or e})"
    weights = list(step_dir.glob("model*.safetensors")) + list(step_dir.glob("adapter_model.safetensors"))
    if not weights:
        return "no weights (model.safetensors)"
    if not (step_dir / rank_state_name(0)).is_file():
        return f"no resume state ({rank_state_name(0)})"
    for f in sorted(step_dir.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            return f"{f.name}: {problem}"
    return None


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, whether raised as an OSError or wrapped by safetensors' writer (a plain Exception)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "os error 28" in str(error)


def _is_io_error(error: BaseException) -> bool:
    # safetensors reports write failures as SafetensorError("... I/O error: ..."), not as OSError.
    return isinstance(error, OSError) or "I/O error" in str(error) or is_disk_full(error)


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
    except Exception as e:
        if not _is_io_error(e):
            raise
        shutil.rmtree(path.parent, ignore_errors=True)
        what = "disk full" if is_disk_full(e) else (getattr(e, "strerror", None) or str(e))
        raise UserError(f"rank {rank}: could not write its resume state {path}: {what}") from None
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        write_text_atomic(run_dir / "latest", final.name + "\n")
    except Exception as e:
        if not _is_io_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        for rank in range(1, world_size):
            shutil.rmtree(_staged_state(run_dir, step, rank).parent, ignore_errors=True)
        prev = latest_step_dir(run_dir)
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else "; no earlier checkpoint exists"
        if is_disk_full(e):
            raise UserError(f"disk full while saving checkpoint {final}{kept}") from None
        raise UserError(f"could not save checkpoint {final}: {getattr(e, 'strerror', None) or e}{kept}") from None
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


def _discard(path: Path) -> None:
    """Delete a directory so that a crash midway leaves nothing that looks like a step: it is first
    renamed to a `.tmp-` name (atomic), which the next prune removes if this one is cut short."""
    trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def prune_steps(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step dirs (never the one `latest` names), step dirs left
    half-deleted by a crash (no meta.json) and stale temporary dirs.

    Only the process that holds the run's lock calls this (`rundir.claim`), so any `.tmp-*` entry
    not made by this process is debris of a dead one.
    """
    keep = latest_step_dir(run_dir)
    complete = list_steps(run_dir)
    for p in complete[:-keep_last]:
        if p != keep:
            _discard(p)
    for p in run_dir.glob(f"{STEP_PREFIX}*"):
        if p.is_dir() and not (p / "meta.json").exists() and p != keep:
            _discard(p)
    for p in run_dir.glob(".tmp-*"):
        if not p.name.endswith(f"-{os.getpid()}") or p.name.startswith(".tmp-trash-"):
            shutil.rmtree(p, ignore_errors=True)


def check_world_size(step_dir: Path, world_size: int) -> dict[str, Any]:
    """The step's trainer_state.json, if it was saved by `world_size` processes.

    Raises:
        UserError: unreadable, or saved by another number of processes (each process's sampling RNG
            and rollout buffer are in its own file).
    """
    try:
        trainer_state = json.loads((step_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot resume from {step_dir}: resume state unreadable ({e})") from None
    saved_world = int(trainer_state.get("world_size", 1))
    if saved_world != world_size:
        raise UserError(f"cannot resume from {step_dir} with {world_size} process(es): it was saved by {saved_world} "
                        f"(each process's sampling RNG and rollout buffer are in its own file); "
                        f"resume with --num-processes {saved_world}")
    return trainer_state


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

    trainer_state = check_world_size(step_dir, world_size)
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
