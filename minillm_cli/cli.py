"""The `minillm` command line: parse, then hand over to the command bodies (`commands/`, `evaluate/`,
`export/`). Every option is declared once, in `commands/options.py`.

This module must import neither torch nor transformers (shell completion re-runs the program on
every TAB, and `--help` should be instant): engine modules are imported inside command bodies.
Errors become one line and an exit code here (`_guard`): 2 for bad input, the run's own code for
a stop (1 for safety, 130 / 143 for SIGINT / SIGTERM).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax

from minillm_cli import __version__
from minillm_cli.commands.options import (
    OVERRIDES_ARG,
    RECIPE_ARG,
    is_override,
    option,
    recipe_flags,
    renamed,
    required,
    split_recipe,
)
from minillm_cli.errors import ReportedElsewhere, RunStopped, UserError

app = typer.Typer(
    name="minillm",
    help="Distill a large causal language model into a small one (MiniLLM: reverse-KL policy gradient) "
    "and run its baselines, evaluation and export.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

MAX_ERROR_CHARS = 600
"""An error line is cut after this many characters."""
_last_error: list[str] = []
"""The message of the last error (for `--json` run summaries)."""


def _fail(message: str, code: int) -> None:
    # Under a launcher every process stops with the same error (ranks agree on setup errors): one prints it.
    if os.environ.get("RANK", "0") == "0":
        from rich.text import Text

        from minillm_cli.commands.launch import write_status

        # The message holds paths, column lists and user text: never read it as rich markup. One line,
        # and a bounded one: a message quoting user input (a huge override, say) is cut.
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}… ({len(message) - MAX_ERROR_CHARS} more characters)"
        _last_error.append(message)
        err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
        write_status(code, message)  # a worker of a multi-process run: for the launching process
    else:
        import time

        time.sleep(1.0)  # the launcher stops every process once one exits: leave rank 0 time to print
    raise typer.Exit(code)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: user errors -> one line + exit 2; stops -> their message + exit code."""
    try:
        return fn()
    except UserError as e:
        _fail(str(e), 2)
    except RunStopped as e:
        _fail(str(e), e.exit_code)
    except ReportedElsewhere as e:  # a multi-process run: its rank 0 printed the line
        if e.message is None:
            err_console.print(f"the multi-process run stopped with exit code {e.exit_code}; its own message is "
                              "above", highlight=False, soft_wrap=True)
        else:
            _last_error.append(e.message)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _fail("interrupted before training started; nothing was written", 130)
    except RuntimeError as e:
        if "home directory" not in str(e):  # `~user` of no such user, in a path no check named
            raise
        _fail(f"a path starting with ~user names no user of this machine ({e})", 2)
    except OSError as e:  # the environment, not a bug: a full disk, a read-only or vanished path
        import errno

        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        _fail(f"{e.filename}: {what}" if e.filename else what, 2)


def _summarized(command: str, json_out: Optional[str], body: Callable[[dict[str, Any]], Any],
                cli_inputs: Optional[dict[str, Path]] = None) -> None:
    """Run a training command's body under `_guard`; with `--json`, write the run summary on every exit.

    `body(report)` puts the run directory into `report["run_dir"]` as soon as it is known, and sets
    `report["no_summary"]` when the summary's destination turned out to be an input of the run.
    `cli_inputs`: the inputs named on the command line (recipe file, flags), checked first."""
    if json_out is None:
        _guard(lambda: body({}))
        return
    import time

    from minillm_cli.commands import run_summary
    from minillm_cli.runs.destinations import check_file

    # A destination that cannot be written, or that names an input given on the command line, is
    # refused before any work and gets no summary (writing one would replace that input).
    _guard(lambda: check_file("--json", json_out, cli_inputs))
    global console
    saved_console = console
    if json_out == "-":  # stdout carries the summary alone
        console = Console(stderr=True)
    report: dict[str, Any] = {}
    t0, code = time.time(), 0
    try:
        _guard(lambda: body(report))
    except typer.Exit as e:
        code = e.exit_code
        raise
    finally:
        console = saved_console
        if os.environ.get("RANK", "0") == "0" and not report.get("no_summary"):
            problem = run_summary.write_for(command, json_out, code, _last_error[-1] if code and _last_error else None,
                                            report.get("run_dir"), time.time() - t0)
            if problem:
                err_console.print(f"error: {problem}", highlight=False, markup=False)


def _version(value: bool) -> None:
    if value:
        console.print(f"minillm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Distill a large causal language model into a small one."""


def _training_command(command: str, params: dict[str, Any]) -> None:
    """`distill` and `sft` with a recipe or flags (not the quickstart)."""
    from minillm_cli.commands.train import cli_inputs, run_training

    flags = recipe_flags(params)
    recipe, rest = split_recipe(params["recipe"], params["overrides"])
    method = params.get("method") or ("sft" if command == "sft" else "minillm")
    json_out = params["json_out"]
    _summarized(command, json_out, lambda report: run_training(
        recipe, rest, flags, method, console=console, resume=params["resume"], dry_run=params.get("dry_run", False),
        num_processes=params["num_processes"], accelerate_config=params["accelerate_config"],
        extend=params["extend"], show_recipe=params["show_recipe"], json_out=json_out, report=report),
        cli_inputs(recipe, flags))


@app.command()
def distill(
    recipe: Optional[str] = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    teacher: Optional[str] = option("teacher"),
    student: Optional[str] = option("student"),
    data: Optional[str] = option("data"),
    output: Optional[str] = option("output"),
    method: Optional[str] = option("method"),
    max_steps: Optional[int] = option("max_steps"),
    resume: bool = option("resume"),
    extend: bool = option("extend"),
    overwrite: bool = option("overwrite"),
    dry_run: bool = option("dry_run"),
    num_processes: Optional[int] = option("num_processes"),
    accelerate_config: Optional[str] = option("accelerate_config"),
    json_out: Optional[str] = option("json_out"),
    show_recipe: bool = option("show_recipe"),
) -> None:
    """Distill a teacher into a student (MiniLLM by default; baselines with method=kd|seqkd|gkd).

    With no recipe and no --teacher, runs the quickstart: SmolLM2-135M-Instruct distilled into a
    layer-pruned copy of itself on the built-in dataset, then evaluated.
    """
    params = dict(locals())
    if (recipe is None and not overrides and all(v is None for v in recipe_flags(params).values()) and not resume
            and not dry_run and not extend and num_processes is None and accelerate_config is None):
        from minillm_cli.commands.quickstart import run_quickstart

        _summarized("distill", json_out, lambda report: report.update(
            run_dir=run_quickstart(console, show_recipe=show_recipe)))
        return
    _training_command("distill", params)


@app.command()
def sft(
    recipe: Optional[str] = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    student: Optional[str] = option("student"),
    data: Optional[str] = option("data"),
    output: Optional[str] = option("output"),
    max_steps: Optional[int] = option("max_steps"),
    resume: bool = option("resume"),
    extend: bool = option("extend"),
    overwrite: bool = option("overwrite"),
    num_processes: Optional[int] = option("num_processes"),
    accelerate_config: Optional[str] = option("accelerate_config"),
    json_out: Optional[str] = option("json_out"),
    show_recipe: bool = option("show_recipe"),
) -> None:
    """Supervised fine-tuning of a model on instruction data (response tokens only, EOS trained)."""
    _training_command("sft", dict(locals()))


@app.command("_train", hidden=True)
def train_job(job: Path = typer.Argument(..., help="Job file written by the launching `minillm distill|sft`.")) -> None:
    """One process of a multi-process run: train exactly the recipe the launching process resolved."""

    def body() -> None:
        import json

        from minillm_cli.commands.train import train_here
        from minillm_cli.config.validation import validate

        try:
            payload = json.loads(job.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{job}: not a minillm job file ({e})") from None
        train_here(validate(payload["recipe"]), payload["source"], console, resume=payload["resume"],
                   extend=payload["extend"], show_recipe=payload.get("show_recipe", False))

    _guard(body)


@app.command()
def plan(
    recipe: Optional[str] = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    teacher: Optional[str] = option("teacher"),
    student: Optional[str] = option("student"),
    num_processes: Optional[int] = option("num_processes"),
    sharding: str = option("sharding"),
    device_memory: Optional[str] = option("device_memory"),
    activation_checkpointing: Optional[bool] = option("activation_checkpointing"),
) -> None:
    """Estimate the memory per device of a training run from the models' config.json (no weights loaded)."""

    def body() -> None:
        from minillm_cli.commands.plan import fits, parse_size, print_plan
        from minillm_cli.config.loading import load_recipe

        path, rest = split_recipe(recipe, overrides)
        r, _ = load_recipe(path, rest, {"models.teacher": teacher, "models.student": student})
        memory = parse_size(device_memory) if device_memory is not None else None
        result = print_plan(r, console, num_processes=num_processes or 1, sharding=sharding, device_memory=memory,
                            activation_checkpointing=activation_checkpointing)
        if memory is not None and not fits(result, memory):
            raise typer.Exit(1)

    _guard(body)


@app.command("teacher-cache")
def teacher_cache(
    recipe: Optional[str] = RECIPE_ARG,
    overrides: Optional[list[str]] = OVERRIDES_ARG,
    teacher: Optional[str] = option("teacher"),
    student: Optional[str] = option("student"),
    data: Optional[str] = option("data"),
    output: Optional[str] = option("output"),
    out: Optional[str] = option("out_alias"),
    top_k: int = option("top_k"),
    dtype: Optional[str] = option("dtype"),
    shard_examples: int = option("shard_examples"),
    batch_size: Optional[int] = option("batch_size"),
    answers: bool = option("answers"),
) -> None:
    """Run the teacher once over the training data and cache its top-k log-probs for `method: kd`
    (or, with --answers, its answers for `method: seqkd`) with `data.teacher_cache`: the run then
    loads no teacher."""

    def body() -> None:
        from minillm_cli.commands.teacher_cache import build_cache
        from minillm_cli.config.loading import load_recipe

        path, rest = split_recipe(recipe, overrides)
        r, _ = load_recipe(path, rest, {"models.teacher": teacher, "models.student": student, "data.train": data})
        from minillm_cli.runs.destinations import check_home

        target = renamed(output, out, "-o/--output") or r.data.teacher_cache
        if target is None:
            raise UserError("-o/--output: name the cache directory (or set data.teacher_cache in the recipe)")
        check_home("-o/--output", target)
        build_cache(r, Path(target).expanduser(), top_k=top_k, dtype=dtype or "fp16", shard_examples=shard_examples,
                    batch_size=batch_size, answers=answers, console=console, recipe_file=path)

    _guard(body)


@app.command("eval")
def eval_cmd(
    models: list[str] = typer.Argument(..., help="Checkpoints (run dir, step dir, model dir, .gguf or alias), then "
                                       "eval.* overrides as key=value (e.g. top_p=0.9)."),
    data: str = required("data"),
    teacher: Optional[str] = option("teacher"),
    metrics: Optional[str] = option("metrics"),
    seeds: Optional[str] = option("seeds"),
    greedy: bool = option("greedy"),
    max_samples: Optional[int] = option("max_samples"),
    max_new_tokens: Optional[int] = option("max_new_tokens"),
    batch_size: Optional[int] = option("batch_size"),
    label_words: Optional[str] = option("label_words"),
    json_out: Optional[str] = option("json_out"),
    samples_out: Optional[str] = option("samples_out"),
    plot_out: Optional[str] = option("plot_out"),
    fail_under: Optional[list[str]] = option("fail_under"),
    baseline: Optional[str] = option("baseline"),
    set_alias: Optional[list[str]] = option("set_alias"),
) -> None:
    """Evaluate checkpoints side by side with the paper's protocol (Rouge-L over 5 seeds and more)."""
    options = dict(locals())  # the parameters are named as run_eval's keywords
    del options["set_alias"]
    options["models"] = [m for m in models if not is_override(m)]
    options["overrides"] = [m for m in models if is_override(m)] + list(set_alias or [])

    def body() -> None:
        from minillm_cli.evaluate.command import run_eval

        code = run_eval(**{**options, "fail_under": fail_under or []}, console=console)
        if code:
            raise typer.Exit(code)

    _guard(body)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory or step directory to export."),
    output: Optional[Path] = option("output"),
    out: Optional[Path] = option("out_alias"),
    fmt: str = option("format"),
    dtype: Optional[str] = option("dtype"),
    shard_size: str = option("shard_size"),
    merge: bool = option("merge"),
    gguf_type: str = option("gguf_type"),
    step: str = option("step"),
    overwrite: bool = option("overwrite"),
    verify: bool = option("verify"),
) -> None:
    """Export a trained student as a Hugging Face safetensors directory (with model card) or GGUF."""

    def body() -> None:
        from minillm_cli.export import ExportOptions
        from minillm_cli.export import export as do_export
        from minillm_cli.runs.destinations import check_home

        target = renamed(output, out, "-o/--output")
        if target is None:
            raise UserError("-o/--output: name the directory to export to")
        check_home("RUN", run)
        check_home("-o/--output", target)
        if fmt not in ("safetensors", "gguf"):
            raise UserError(f"--format: must be safetensors or gguf, got {fmt!r}")
        opts = ExportOptions(out=target, format=fmt, dtype=dtype, shard_size=shard_size, merge_lora=merge,
                             gguf_type=gguf_type, step=step, overwrite=overwrite, verify=verify)
        result = do_export(run, opts, console=console)
        console.print(f"exported {result.step_dir} -> {result.out} ({len(result.files)} files)")
        if verify:
            console.print(f"verified: max |logit diff| = {result.max_abs_logit_diff:.3g} (tolerance {result.tolerance:.3g})")

    _guard(body)


@app.command()
def recipes(name: Optional[str] = typer.Argument(None, help="Show this shipped recipe.")) -> None:
    """List the shipped recipes, or print one."""
    from minillm_cli.config.loading import RECIPES_DIR, find_shipped, read_recipe_file, shipped_recipes

    if name is None:
        for p in shipped_recipes():
            first = next((line[1:].strip() for line in p.read_text().splitlines() if line.startswith("#")), "")
            console.print(f"[bold]{p.relative_to(RECIPES_DIR).with_suffix('')}[/]  {first}", highlight=False)
        return
    path = find_shipped(name)
    if path is None:
        _fail(f"no shipped recipe named {name!r} (see `minillm recipes`)", 2)
        return
    read_recipe_file(path)  # shipped recipes are YAML; this also catches a broken one
    console.print(Syntax(path.read_text(), "yaml", theme="ansi_dark", background_color="default"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
