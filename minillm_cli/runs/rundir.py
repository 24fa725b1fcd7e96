"""The run directory: what makes a directory a minillm run, who owns it, and what may be deleted.

The promises this module keeps (README, "What minillm promises"):

* A run directory holds only what minillm writes (`RUN_FILES`, step dirs, temporary `.tmp-*`
  entries) and is marked by `.minillm-run`. `--overwrite` empties a directory only if it is such a
  run (or empty): anything else, or a run holding a file minillm did not write, is refused with the
  names of what is there. It never deletes the current directory or a directory holding an input
  of the run (data, teacher, student).
* One process owns a run directory at a time: an advisory lock (`flock`) on `RUN/.minillm.lock`, released
  by the kernel when the process exits, however it exits (kill -9 included). A second process gets a
  one-line error naming the owner's pid.
* A run started into a fresh directory that fails before its first checkpoint leaves a run with
  nothing to resume; the next start may replace it without `--overwrite` (it holds no result).
* `--resume` picks the newest intact step: `latest`, or, if that step is damaged (truncated or
  garbage files), the newest earlier step that is intact, saying which one it skipped and why.

* Eval and export read runs only through here: the step `--step` names (`pick_step`: latest, a
  number, `best:<metric>`), a run dir given as a model (`model_step`), a LoRA step's base (`lora_base`),
  metrics.jsonl (`read_metrics`).

This module must stay light (no torch): the CLI imports it to find a run's saved recipe.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm_cli.errors import UserError
from minillm_cli.runs import checkpoint as ckpt

MARKER = ".minillm-run"
LOCK = ".minillm.lock"
SEQKD_CACHE = "seqkd-teacher-responses.jsonl"
RUN_FILES = frozenset({MARKER, LOCK, "recipe.yaml", "metrics.jsonl", "latest", SEQKD_CACHE, "curves.png",
                       "tracking"})
"""File names minillm writes at the top of a run directory."""
_RUN_PATTERN = re.compile(r"^(step-\d{6,}|\.tmp-.+|\..+\.tmp-\d+)$")
"""Step dirs and the temporary names of atomic writes (`.tmp-step-…`, `.latest.tmp-PID`)."""
_LEGACY_HEADER = "# resolved minillm recipe"


def is_run_entry(name: str) -> bool:
    return name in RUN_FILES or bool(_RUN_PATTERN.match(name))


def is_run(path: Path) -> bool:
    """A minillm run: marked, or (runs made before the marker existed) a resolved recipe at its top."""
    if (path / MARKER).is_file():
        return True
    try:
        with open(path / "recipe.yaml", encoding="utf-8") as f:
            return f.readline().startswith(_LEGACY_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _foreign(path: Path) -> list[str]:
    """Entries of `path` that minillm did not write (directories shown with a trailing /)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not is_run_entry(p.name))


def _shown(names: list[str], limit: int = 5) -> str:
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


@dataclass
class Claim:
    """Ownership of a run directory by this process (see `claim`)."""

    path: Path
    mode: str
    """fresh, overwrite or resume."""
    created: list[Path] = field(default_factory=list)
    """Directories this claim created, deepest first (removed again by `abandon`)."""
    lock_created: bool = False
    prepared: bool = False
    """The directory became the run's (`prepare`): from then on it is never removed again."""
    _fd: int | None = None

    def prepare(self) -> None:
        """Make the directory the new run's (after every input was checked): empty it when it is
        replaced (only minillm's own entries are there; `claim` checked), then mark it."""
        self.prepared = True
        if self.mode != "resume":
            for p in self.path.iterdir():
                if p.name == LOCK:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        marker = self.path / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n", encoding="utf-8")

    def release(self) -> None:
        """Give the directory up (the lock file stays: it belongs to the run)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """Undo the claim after a failed setup: whatever it created is removed again (a no-op once
        the directory was prepared: a run that started keeps its directory)."""
        if self.prepared:
            return
        lock = self.path / LOCK
        self.release()
        if self.lock_created:
            lock.unlink(missing_ok=True)
        for d in self.created:
            try:
                d.rmdir()  # only if empty: nothing of anyone else's is ever removed
            except OSError:
                break


def _first_missing(path: Path) -> list[Path]:
    """`path` and its missing ancestors, deepest first (what mkdir(parents=True) will create)."""
    out = []
    p = path
    while not p.exists():
        out.append(p)
        if p.parent == p:
            break
        p = p.parent
    return out


def _check(path: Path, mode: str, protected: dict[str, Path]) -> None:
    """Whether a run may start in `path` in `mode` (fresh / overwrite / resume); raises if not."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is not a directory")
    present = path.is_dir() and any(p.name != LOCK for p in path.iterdir())  # our own lock: still empty
    if mode == "resume":
        if not path.is_dir():
            raise UserError(f"--resume: no run directory {path}")
        if not is_run(path):
            raise UserError(f"--resume: {path} is not a minillm run (no {MARKER} or recipe.yaml)")
        return
    if not present:
        return
    foreign = _foreign(path)
    run = is_run(path)
    if not run:
        if mode == "overwrite":
            raise UserError(f"--overwrite: {path} is not a minillm run (it holds {_shown(foreign)}); "
                            "refusing to delete it: choose another -o, or empty it yourself")
        raise UserError(f"output.dir: {path} already exists and is not a minillm run (it holds {_shown(foreign)}); "
                        "choose another -o")
    if foreign:
        raise UserError(f"output.dir: the run {path} also holds files minillm did not write ({_shown(foreign)}); "
                        "move them out first: they would be deleted with the run")
    if mode == "fresh" and ckpt.list_steps(path):
        raise UserError(f"output.dir: {path} already holds a run; pass --resume to continue it or --overwrite to "
                        "replace it")
    # overwrite, or a run without a checkpoint (a failed start: nothing to resume, nothing lost)
    cwd = Path.cwd().resolve()
    if _within(cwd, path.resolve()):
        raise UserError(f"--overwrite: refusing to delete {path}: it contains the current directory")
    for key, p in protected.items():
        if _within(p.resolve(), path.resolve()):
            raise UserError(f"--overwrite: refusing to delete {path}: it contains {key} ({p}), which this run reads")


def _owner(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
    except (OSError, ValueError, AttributeError):
        return "pid unknown"


def _held_by(lock: Path) -> str | None:
    """The owner of a run's lock if a live process holds it (reads the lock, never creates it)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _owner(lock)
    finally:
        os.close(fd)


def claim(path: Path, *, resume: bool, overwrite: bool, protected: dict[str, Path] | None = None) -> Claim:
    """Take ownership of the run directory `path` for this process, before any model work.

    Checks what is there (see the module docstring), creates the directory if needed and locks it.
    Nothing is deleted here: `Claim.prepare` empties a replaced run once every input was checked,
    and `Claim.abandon` removes what this call created if the setup fails.

    Args:
        protected: inputs of the run (recipe key -> path) that an overwrite must never delete.

    Raises:
        UserError: contradictory flags, a file or foreign directory at `path`, a run with results
            and neither --resume nor --overwrite, no run to resume, an unwritable location, or a
            directory owned by another live process (naming its pid).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in -o, "
                        "--overwrite replaces it; pass one")
    mode = "resume" if resume else "overwrite" if overwrite else "fresh"
    protected = protected or {}
    owner = _held_by(path / LOCK)
    if owner is not None:
        raise UserError(f"output.dir: {path} is in use by another minillm process ({owner}); "
                        "wait for it to finish or choose another -o")
    _check(path, mode, protected)
    created = _first_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output.dir: cannot create {path}: {e.strerror or e}") from None
    result = Claim(path=path, mode=mode, created=created)
    lock = path / LOCK
    result.lock_created = not lock.exists()
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        result.abandon()
        raise UserError(f"output.dir: {path} is not writable ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"output.dir: {path} is in use by another minillm process ({_owner(lock)}); "
                        "wait for it to finish or choose another -o") from None
    result._fd = fd
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        # Under the lock, look again: another process may have finished a run here in the meantime.
        _check(path, mode, protected)
    except OSError as e:
        result.abandon()
        raise UserError(f"output.dir: {path} is not writable ({e.strerror or e})") from None
    except UserError:
        result.abandon()
        raise
    return result


def resumable_step(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest intact step dir of a run, and a note for each newer one that was skipped.

    Raises:
        UserError: no step is intact (every problem named).
    """
    candidates: list[Path] = []
    latest = ckpt.latest_step_dir(run_dir)
    if latest is not None:
        candidates.append(latest)
    candidates += [p for p in reversed(ckpt.list_steps(run_dir)) if p != latest]
    skipped: list[str] = []
    for step in candidates:
        problem = ckpt.step_problem(step)
        if problem is None:
            return step, skipped
        skipped.append(f"{step.name} ({problem})")
    if not skipped:
        raise UserError(f"--resume: no complete checkpoint in {run_dir} (nothing was saved: run it again "
                        "without --resume)")
    raise UserError(f"--resume: no intact checkpoint in {run_dir}: {'; '.join(skipped)}")


def saved_recipe(run_dir: Path) -> Path | None:
    """The recipe a run was started with: its resumable step's copy, else the run's own."""
    try:
        step, _ = resumable_step(run_dir)
        return step / "recipe.yaml"
    except UserError:
        return run_dir / "recipe.yaml" if (run_dir / "recipe.yaml").is_file() else None


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop the records of steps after `step` from metrics.jsonl (written by a run that crashed
    after its last checkpoint), so that a resumed run does not repeat them. Returns how many."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            dropped += 1  # a line cut short by the crash
            continue
        if record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        ckpt.write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
