"""Where a command writes what it reports (`--json`, `--samples`, `--plot`) and builds (cache `--out`),
checked before any work.

A report destination is a file path that can be written (missing parent folders are created when it
is written), not a directory, and never one of the run's own inputs: a data file, a model directory
or file, the recipe, a teacher cache or run directory, or anything inside them. A directory
destination (a cache `--out`) may in addition not contain an input. Each problem is one `UserError`
naming the flag and the input it would destroy. No torch import: the CLI uses this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from minillm_cli.errors import UserError

if TYPE_CHECKING:
    from minillm_cli.config.schema import Recipe

STDOUT = "-"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def existing_path(value: object) -> Path | None:
    """`value` as a path when it names something on disk (a hub id or an alias does not), else None."""
    if not isinstance(value, (str, Path)) or not str(value):
        return None
    try:
        p = Path(value).expanduser()
        return p if p.exists() else None
    except (OSError, ValueError, RuntimeError):  # a NUL byte, `~nobody`: not a usable path, nothing of the user's
        return None


def check_home(flag: str, value: str | Path | None) -> None:
    """A path given as `~user/...` must name a user of this machine.

    Raises:
        UserError: naming the flag and the path.
    """
    if isinstance(value, (str, Path)) and str(value).startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            raise UserError(f"{flag} {value}: {str(value).split('/')[0]} is the home directory of no user here") from None


def recipe_inputs(recipe: Recipe, recipe_file: str | Path | None = None) -> dict[str, Path]:
    """The run's local inputs (what names it -> path), which nothing minillm writes may replace or delete."""
    keys = {"data.train": recipe.data.train, "data.dev": recipe.data.dev, "data.corpus": recipe.data.corpus,
            "data.teacher_cache": recipe.data.teacher_cache,
            "models.teacher": recipe.models.teacher, "models.student": recipe.models.student}
    out = {key: p for key, value in keys.items() if (p := existing_path(value)) is not None}
    if recipe_file is not None and (p := existing_path(recipe_file)) is not None:
        out["the recipe"] = p
    return out


def _clash(flag: str, shown: str, target: Path, inputs: Mapping[str, Path], directory: bool) -> None:
    for name, path in inputs.items():
        source = _real(path)
        if _inside(target, source):
            where = "is" if target == source else "is inside"
            raise UserError(f"{flag} {shown}: {where} {name} ({path}), which this run reads or writes; write it elsewhere")
        if directory and _inside(source, target):
            raise UserError(f"{flag} {shown}: contains {name} ({path}), which this run reads; use another directory")


def check_file(flag: str, path: str, inputs: Mapping[str, Path] | None = None, *, stdout: bool = True) -> None:
    """Refuse a report destination that cannot be written or that is an input of the run.

    Args:
        flag: the option, for the message (`--json`).
        path: as given; `-` is standard output when `stdout`.
        inputs: what names each input -> its path (`recipe_inputs`, models, eval data ...).

    Raises:
        UserError: empty, a directory, under something that is not a directory, not writable, or an input.
    """
    if stdout and path == STDOUT:
        return
    if not path.strip():
        raise UserError(f"{flag}: empty path; give a file name")
    try:
        if "\x00" in path:
            raise ValueError("NUL byte")
        p = Path(path).expanduser()  # RuntimeError: `~user` of no such user
        is_dir = p.is_dir()
    except (OSError, ValueError, RuntimeError):
        raise UserError(f"{flag} {path!r}: not a usable file path") from None
    if is_dir or path.endswith(os.sep):
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a directory")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path}: {target} is not writable")
    _clash(flag, path, _real(p), inputs or {}, directory=False)


def check_directory(flag: str, path: Path, inputs: Mapping[str, Path]) -> None:
    """Refuse a directory destination that is, is inside, or contains an input of the run.

    Raises:
        UserError: naming the input.
    """
    _clash(flag, str(path), _real(path), inputs, directory=True)


def check_distinct(named: Mapping[str, str | None]) -> None:
    """Two report flags may not name the same file (the second would replace the first).

    Raises:
        UserError: naming both flags.
    """
    seen: dict[Path, str] = {}
    for flag, path in named.items():
        if path is None or path == STDOUT:
            continue
        real = _real(Path(path))
        if real in seen:
            raise UserError(f"{flag} {path}: the same file as {seen[real]}; give each output its own file")
        seen[real] = flag
