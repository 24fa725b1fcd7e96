"""Regenerate the shell completion scripts from the Typer app: `python completions/generate.py`.

The scripts call back into `minillm` for the candidates, so they stay correct as commands and
options change; this file only has to be re-run when Typer's script format changes. A test fails
when the committed scripts differ from what this produces.
"""

from __future__ import annotations

from pathlib import Path

from typer.completion import get_completion_script

HERE = Path(__file__).resolve().parent
SHELLS = {"bash": "minillm.bash", "zsh": "_minillm", "fish": "minillm.fish"}


def render(shell: str) -> str:
    """The completion script for `shell`, as Typer generates it for the `minillm` program."""
    import minillm_cli.cli  # noqa: F401  (the app must import cleanly for completion to work)

    return get_completion_script(prog_name="minillm", complete_var="_MINILLM_COMPLETE", shell=shell).rstrip() + "\n"


def main() -> None:
    for shell, name in SHELLS.items():
        (HERE / name).write_text(render(shell))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
