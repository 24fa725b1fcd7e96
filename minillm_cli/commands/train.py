"""`minillm distill` and `minillm sft` (with a recipe or flags): resolve the recipe, check what can be
checked, then train in this process or launch several.

Reads top to bottom: the recipe (a resumed run's saved one as the base), the `--json` destination
against the run's inputs, then either a dry run (the memory plan), a multi-process launch
(`commands.launch`), or `train.loop.train` here. What is printed first is a short summary of the
run; the whole resolved recipe is written to RUN/recipe.yaml and printed only with --show-recipe.

No torch import at module level: the CLI imports this.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.syntax import Syntax

from minillm_cli.errors import ReportedElsewhere, UserError

if TYPE_CHECKING:
    from minillm_cli.config.schema import Recipe


def run_training(recipe_path: str | None, overrides: list[str], flags: dict[str, Any], method: str, *,
                 console: Console, resume: bool = False, dry_run: bool = False, num_processes: int | None = None,
                 accelerate_config: str | None = None, extend: bool = False, show_recipe: bool = False,
                 json_out: str | None = None, report: dict[str, Any] | None = None) -> None:
    """The body of `minillm distill|sft RECIPE ...`; fills `report["run_dir"]` as soon as it is known.

    Raises:
        UserError: bad input, before any work where it can be found then.
        RunStopped: a signal or a stop for safety (exit code inside).
        ReportedElsewhere: a multi-process run failed; its rank 0 printed why.
    """
    from minillm_cli.config.loading import load_recipe, output_dir_of
    from minillm_cli.runs.rundir import saved_recipe

    report = report if report is not None else {}
    base = None
    if extend and not resume:
        raise UserError("--extend continues a run with more steps: use it with --resume")
    if resume:
        # --resume alone continues the run as it was started: its saved recipe is the base, and what
        # is given now only overrides it (and is checked against it before any work).
        out = output_dir_of(recipe_path, overrides, flags)
        if out is None:
            raise UserError("--resume: name the run to continue with -o RUN")
        base = saved_recipe(Path(out))
    recipe, source = load_recipe(recipe_path, overrides, flags, default_method=method, base=base)
    check_json_against(json_out, recipe, recipe_path, report)
    report["run_dir"] = recipe.output.dir  # None: set_up picks a fresh runs/<method>-<time> (set below)
    if recipe.method.name != method and method == "sft":
        raise UserError(f"method.name: `minillm sft` runs method sft, the recipe says {recipe.method.name}; use "
                        "`minillm distill`")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num_processes}")

    if dry_run:
        from minillm_cli.commands.launch import accelerate_config_path
        from minillm_cli.commands.plan import print_plan, sharding_of

        show(recipe, source, console, full=show_recipe)
        sharding = sharding_of(accelerate_config_path(accelerate_config)) if accelerate_config else "none"
        print_plan(recipe, console, num_processes=num_processes or 1, sharding=sharding)
    elif (num_processes or 1) > 1 or accelerate_config is not None:
        _launch(recipe, source, console, num_processes, accelerate_config, resume, extend, show_recipe)
    else:
        report["run_dir"] = train_here(recipe, source, console, resume=resume, extend=extend, show_recipe=show_recipe)


def _launch(recipe: Recipe, source: dict[str, str], console: Console, num_processes: int | None,
            accelerate_config: str | None, resume: bool, extend: bool, show_recipe: bool) -> None:
    """Several processes: everything checkable is checked before any starts; the workers' rank 0 prints
    its own error line, which comes back with the exit code."""
    from minillm_cli.commands.launch import check_before_launch, launch_processes

    world, config = check_before_launch(recipe, num_processes, accelerate_config, resume=resume, extend=extend)
    job = {"recipe": recipe.model_dump(mode="json", by_alias=True), "source": source, "resume": resume,
           "extend": extend, "show_recipe": show_recipe}
    code, message = launch_processes(job, world, config, console)
    if code:
        raise ReportedElsewhere(message, code)


def train_here(recipe: Recipe, source: dict[str, str], console: Console, *, resume: bool, extend: bool,
               show_recipe: bool) -> Path:
    """Say what runs (rank 0) and train it in this process; returns the run directory."""
    show(recipe, source, console, full=show_recipe)
    from minillm_cli.train.loop import train

    return train(recipe, source, resume=resume, extend=extend, console=console)


def show(recipe: Recipe, source: dict[str, str], console: Console, *, full: bool) -> None:
    """One line on what runs, or (`full`) the whole resolved recipe with where each value came from."""
    if os.environ.get("RANK", "0") != "0":
        return
    if full:
        from minillm_cli.config.loading import dump_resolved

        console.print(Syntax(dump_resolved(recipe, source), "yaml", theme="ansi_dark", background_color="default"))
        return
    console.print(summary_line(recipe), highlight=False, markup=False, soft_wrap=True)


def summary_line(recipe: Recipe) -> str:
    """`method: teacher -> student, data, steps x sequences, run dir` in one line."""
    m, tr = recipe.models, recipe.train
    student = m.student or (f"{m.student_init.from_} ({m.student_init.keep or m.student_init.layers})"
                            if m.student_init is not None else "?")
    models = f"{m.teacher} -> {student}" if m.teacher and recipe.method.name != "sft" else f"{student}"
    accum = f" x {tr.grad_accum} accumulated" if tr.grad_accum > 1 else ""
    where = recipe.output.dir or "runs/<method>-<time>"
    return (f"{recipe.method.name}: {models} | data {recipe.data.train} | {tr.max_steps} steps of {tr.batch_size} "
            f"sequences{accum} | run dir {where} (resolved recipe in its recipe.yaml; --show-recipe prints it)")


def cli_inputs(recipe_path: str | None, flags: dict[str, Any]) -> dict[str, Path]:
    """The inputs named on the command line (recipe file, --data, --teacher, --student) and the run
    directory (-o): what an output flag may never name."""
    from minillm_cli.runs.destinations import existing_path

    out = {name: p for name, value in (("the recipe", recipe_path), ("data.train", flags.get("data.train")),
                                        ("models.teacher", flags.get("models.teacher")),
                                        ("models.student", flags.get("models.student")))
           if (p := existing_path(value)) is not None}
    if flags.get("output.dir"):
        out["the run directory"] = Path(flags["output.dir"])
    return out


def check_json_against(json_out: str | None, recipe: Recipe, recipe_path: str | None, report: dict[str, Any]) -> None:
    """`--json` may not name an input of the resolved recipe or a file inside its run directory."""
    if json_out is None:
        return
    from minillm_cli.runs.destinations import check_file, recipe_inputs

    inputs = recipe_inputs(recipe, recipe_path)
    if recipe.output.dir:
        inputs["the run directory"] = Path(recipe.output.dir)
    try:
        check_file("--json", json_out, inputs)
    except UserError:
        report["no_summary"] = True  # the summary would replace that input
        raise
