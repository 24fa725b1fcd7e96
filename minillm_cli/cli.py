"""The `minillm` command line: parse, load the recipe, hand over to the engine.

This module must import neither torch nor transformers (shell completion re-runs the program on
every TAB, and `--help` should be instant): engine modules are imported inside command bodies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax

from minillm_cli import __version__
from minillm_cli.errors import RunStopped, UserError

if TYPE_CHECKING:
    from minillm_cli.config import Recipe

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

RecipeArg = typer.Argument(None, help="Recipe YAML file or shipped recipe name; then section.key=value overrides.",
                           show_default=False)
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=1e-5 train.max_steps=20.", show_default=False)


def _fail(message: str, code: int) -> None:
    # Under a launcher every process stops with the same error (ranks agree on setup errors): one prints it.
    if os.environ.get("RANK", "0") == "0":
        from rich.text import Text

        # The message holds paths, column lists and user text: never read it as rich markup. One line,
        # and a bounded one: a message quoting user input (a huge override, say) is cut.
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}… ({len(message) - MAX_ERROR_CHARS} more characters)"
        _last_error.append(message)
        err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
        from minillm_cli.launch import write_status

        write_status(code, message)  # a worker of a multi-process run: for the launching process
    else:
        import time

        time.sleep(1.0)  # the launcher stops every process once one exits: leave rank 0 time to print
    raise typer.Exit(code)


MAX_ERROR_CHARS = 600
"""An error line is cut after this many characters."""
_last_error: list[str] = []
"""The message of the last `_fail` (for `--json` run summaries)."""


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: user errors -> one line + exit 2; stops -> their message + exit code."""
    try:
        return fn()
    except UserError as e:
        _fail(str(e), 2)
    except RunStopped as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted before training started; nothing was written", 130)
    except OSError as e:  # the environment, not a bug: a full disk, a read-only or vanished path
        import errno

        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        _fail(f"{e.filename}: {what}" if e.filename else what, 2)


def _split_recipe(recipe: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`minillm sft optim.lr=1e-5` has no recipe: an `=` in the first argument makes it an override."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe:
        return None, [recipe, *overrides]
    return recipe, overrides


# ------------------------------------------------------------------ training options, declared once
class _Flag(NamedTuple):
    """One option of `distill` / `sft`: its names, the recipe key it sets (None: a run switch), its help."""

    names: tuple[str, ...]
    key: Optional[str]
    help: str
    default: Any = None


_TRAIN_FLAGS: dict[str, _Flag] = {  # the command parameter's name -> its option
    "teacher": _Flag(("--teacher",), "models.teacher", "Teacher: local dir, .gguf file, alias or hub id."),
    "student": _Flag(("--student",), "models.student", "Student: local dir, .gguf file, alias or hub id."),
    "data": _Flag(("--data",), "data.train", "Training data file (jsonl/json/csv/parquet) or hub id."),
    "output": _Flag(("--output", "-o"), "output.dir", "Run directory."),
    "method": _Flag(("--method",), "method.name", "minillm (default), kd, seqkd, gkd or sft."),
    "max_steps": _Flag(("--max-steps",), "train.max_steps", "Optimizer steps (train.max_steps)."),
    "overwrite": _Flag(("--overwrite",), "output.overwrite", "Replace an existing run directory (only a minillm run).",
                       False),
    "resume": _Flag(("--resume",), None, "Continue the run in --output from its latest intact checkpoint, with its "
                    "saved recipe.", False),
    "extend": _Flag(("--extend",), None, "With --resume: allow a larger train.max_steps (constant schedule only).",
                    False),
    "dry_run": _Flag(("--dry-run",), None, "Validate the recipe and print the memory plan; train nothing.", False),
    "num_processes": _Flag(("--num-processes",), None, "Train in N processes (one per GPU; CPU processes without "
                           "GPUs), started by accelerate launch."),
    "accelerate_config": _Flag(("--accelerate-config",), None, "accelerate config file, or ddp / fsdp / zero3 for "
                               "the shipped ones (minillm_cli/recipes/accelerate/)."),
    "json_out": _Flag(("--json",), None, "Write a machine-readable summary of how the run ended here (- for stdout; "
                      "the run's output then goes to stderr): exit code and its meaning, run dir, final step and "
                      "checkpoint, wall time, tokens/s, last metrics."),
}


def _option(name: str, help: Optional[str] = None) -> Any:
    """The Typer option of training parameter `name` (`help` replaces its text for one command)."""
    flag = _TRAIN_FLAGS[name]
    return typer.Option(flag.default, *flag.names, help=help or flag.help)


def _recipe_flags(params: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters -> {recipe key: value} for those that set one. An unset switch is None:
    `--overwrite` absent leaves the recipe's own `output.overwrite`."""
    return {flag.key: (params[name] or None) if flag.default is False else params[name]
            for name, flag in _TRAIN_FLAGS.items() if flag.key is not None and name in params}


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

    from minillm_cli import run_summary
    from minillm_cli.destinations import check_file

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
            run_dir = report.get("run_dir")
            summary = run_summary.summarize(command, code, _last_error[-1] if code and _last_error else None,
                                            Path(run_dir) if run_dir else None, time.time() - t0)
            try:
                run_summary.write(json_out, summary)
            except OSError as e:
                err_console.print(f"error: --json {json_out}: cannot write ({e.strerror or e})", highlight=False,
                                  markup=False)


def _cli_inputs(recipe_path: Optional[str], flags: dict[str, Any]) -> dict[str, Path]:
    """The inputs named on the command line (recipe file, --data, --teacher, --student) and the run
    directory (-o): what an output flag may never name."""
    from minillm_cli.destinations import existing_path

    out = {name: p for name, value in (("the recipe", recipe_path), ("data.train", flags.get("data.train")),
                                        ("models.teacher", flags.get("models.teacher")),
                                        ("models.student", flags.get("models.student")))
           if (p := existing_path(value)) is not None}
    if flags.get("output.dir"):
        out["the run directory"] = Path(flags["output.dir"])
    return out


def _check_json_against(json_out: Optional[str], recipe: Recipe, recipe_path: Optional[str],
                        report: dict[str, Any]) -> None:
    """`--json` may not name an input of the resolved recipe or a file inside its run directory."""
    if json_out is None:
        return
    from minillm_cli.destinations import check_file, recipe_inputs

    inputs = recipe_inputs(recipe, recipe_path)
    if recipe.output.dir:
        inputs["the run directory"] = Path(recipe.output.dir)
    try:
        check_file("--json", json_out, inputs)
    except UserError:
        report["no_summary"] = True  # the summary would replace that input
        raise


def _run_training(recipe_path: Optional[str], overrides: list[str], flags: dict[str, Any], method: str,
                  resume: bool, dry_run: bool = False, num_processes: Optional[int] = None,
                  accelerate_config: Optional[str] = None, extend: bool = False,
                  report: Optional[dict[str, Any]] = None, json_out: Optional[str] = None) -> None:
    from minillm_cli.recipe_loading import load_recipe, output_dir_of
    from minillm_cli.rundir import saved_recipe

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
    report = report if report is not None else {}
    _check_json_against(json_out, recipe, recipe_path, report)
    report["run_dir"] = recipe.output.dir  # None: set_up picks a fresh runs/<method>-<time> (set below)
    if recipe.method.name != method and method == "sft":
        raise UserError(f"method.name: `minillm sft` runs method sft, the recipe says {recipe.method.name}; use `minillm distill`")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num_processes}")
    launch = (num_processes or 1) > 1 or accelerate_config is not None
    if launch and not dry_run:
        # The recipe is valid (checked above, exit 2 otherwise); what else can be checked is checked
        # before any process starts. The workers' rank 0 prints its own error line.
        from minillm_cli.launch import check_before_launch, launch_processes

        world, config = check_before_launch(recipe, num_processes, accelerate_config, resume=resume, extend=extend)
        job = {"recipe": recipe.model_dump(mode="json", by_alias=True), "source": source, "resume": resume,
               "extend": extend}
        code, message = launch_processes(job, world, config, console)
        if code:
            if message is not None:
                _last_error.append(message)
            else:
                err_console.print(f"the multi-process run stopped with exit code {code}; its own message is above",
                                  highlight=False, soft_wrap=True)
            raise typer.Exit(code)
        return
    if dry_run:
        _print_resolved(recipe, source)
        from minillm_cli.launch import accelerate_config_path
        from minillm_cli.plan import print_plan, sharding_of

        sharding = sharding_of(accelerate_config_path(accelerate_config)) if accelerate_config else "none"
        print_plan(recipe, console, num_processes=num_processes or 1, sharding=sharding)
        return
    report["run_dir"] = _train_resolved(recipe, source, resume, extend)


def _print_resolved(recipe: Recipe, source: dict[str, str]) -> None:
    from minillm_cli.recipe_loading import dump_resolved

    if os.environ.get("RANK", "0") == "0":
        console.print(Syntax(dump_resolved(recipe, source), "yaml", theme="ansi_dark", background_color="default"))


def _train_resolved(recipe: Recipe, source: dict[str, str], resume: bool, extend: bool) -> Path:
    """Print the resolved recipe (rank 0) and train it, in this process; returns the run directory."""
    _print_resolved(recipe, source)
    from minillm_cli.loop import train

    return train(recipe, source, resume=resume, extend=extend, console=console)


def _version(value: bool) -> None:
    if value:
        console.print(f"minillm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Distill a large causal language model into a small one."""


@app.command()
def distill(
    recipe: Optional[str] = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    teacher: Optional[str] = _option("teacher"),
    student: Optional[str] = _option("student"),
    data: Optional[str] = _option("data"),
    output: Optional[str] = _option("output"),
    method: Optional[str] = _option("method"),
    max_steps: Optional[int] = _option("max_steps"),
    resume: bool = _option("resume"),
    extend: bool = _option("extend"),
    overwrite: bool = _option("overwrite"),
    dry_run: bool = _option("dry_run"),
    num_processes: Optional[int] = _option("num_processes"),
    accelerate_config: Optional[str] = _option("accelerate_config"),
    json_out: Optional[str] = _option("json_out"),
) -> None:
    """Distill a teacher into a student (MiniLLM by default; baselines with method=kd|seqkd|gkd).

    With no recipe and no --teacher, runs the quickstart: SmolLM2-135M-Instruct distilled into a
    layer-pruned copy of itself on the built-in dataset, then evaluated.
    """
    flags = _recipe_flags(locals())
    recipe, rest = _split_recipe(recipe, overrides)
    if (recipe is None and not rest and all(v is None for v in flags.values()) and not resume and not dry_run
            and not extend and num_processes is None and accelerate_config is None):
        from minillm_cli.quickstart import run_quickstart

        _summarized("distill", json_out, lambda report: report.update(run_dir=run_quickstart(console)))
        return
    _summarized("distill", json_out, lambda report: _run_training(
        recipe, rest, flags, method or "minillm", resume, dry_run, num_processes, accelerate_config, extend, report,
        json_out), _cli_inputs(recipe, flags))


@app.command()
def sft(
    recipe: Optional[str] = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    student: Optional[str] = _option("student", help="Model to fine-tune: local dir, .gguf, alias or hub id."),
    data: Optional[str] = _option("data"),
    output: Optional[str] = _option("output"),
    max_steps: Optional[int] = _option("max_steps"),
    resume: bool = _option("resume"),
    extend: bool = _option("extend"),
    overwrite: bool = _option("overwrite"),
    num_processes: Optional[int] = _option("num_processes"),
    accelerate_config: Optional[str] = _option("accelerate_config"),
    json_out: Optional[str] = _option("json_out"),
) -> None:
    """Supervised fine-tuning of a model on instruction data (response tokens only, EOS trained)."""
    flags = _recipe_flags(locals())
    recipe, rest = _split_recipe(recipe, overrides)
    _summarized("sft", json_out, lambda report: _run_training(
        recipe, rest, flags, "sft", resume, num_processes=num_processes, accelerate_config=accelerate_config,
        extend=extend, report=report, json_out=json_out), _cli_inputs(recipe, flags))


@app.command("_train", hidden=True)
def train_job(job: Path = typer.Argument(..., help="Job file written by the launching `minillm distill|sft`.")) -> None:
    """One process of a multi-process run: train exactly the recipe the launching process resolved."""

    def body() -> None:
        import json

        from minillm_cli.config import validate

        try:
            payload = json.loads(job.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{job}: not a minillm job file ({e})") from None
        _train_resolved(validate(payload["recipe"]), payload["source"], payload["resume"], payload["extend"])

    _guard(body)


@app.command()
def plan(
    recipe: Optional[str] = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: local dir, known name or cached hub id."),
    student: Optional[str] = typer.Option(None, "--student", help="Student: local dir, known name or cached hub id."),
    num_processes: int = typer.Option(1, "--num-processes", help="Training processes, one per device."),
    sharding: str = typer.Option("none", "--sharding", help="none (a full copy per process), fsdp or zero3."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="Memory of one device, e.g. 80GB: "
                                                "say whether the run fits (exit 1 if not) and what would."),
    activation_checkpointing: Optional[bool] = typer.Option(
        None, "--activation-checkpointing/--no-activation-checkpointing", help="Default: on with fsdp, off otherwise."),
) -> None:
    """Estimate the memory per device of a training run from the models' config.json (no weights loaded)."""

    def body() -> None:
        from minillm_cli.plan import fits, parse_size, print_plan
        from minillm_cli.recipe_loading import load_recipe

        path, rest = _split_recipe(recipe, overrides)
        r, _ = load_recipe(path, rest, {"models.teacher": teacher, "models.student": student})
        memory = parse_size(device_memory) if device_memory is not None else None
        result = print_plan(r, console, num_processes=num_processes, sharding=sharding, device_memory=memory,
                            activation_checkpointing=activation_checkpointing)
        if memory is not None and not fits(result, memory):
            raise typer.Exit(1)

    _guard(body)


@app.command("teacher-cache")
def teacher_cache(
    recipe: Optional[str] = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: local dir, .gguf file, alias or hub id."),
    student: Optional[str] = typer.Option(None, "--student", help="Student whose tokenizer and output width the "
                                          "training run will have (default: the teacher's)."),
    data: Optional[str] = _option("data"),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: the recipe's "
                                       "data.teacher_cache). Rerunning the same command continues it."),
    top_k: int = typer.Option(64, "--top-k", help="Teacher ids kept per response position (+ one tail bucket)."),
    dtype: str = typer.Option("fp16", "--dtype", help="Storage dtype of the log-probs: fp16, bf16 or fp32."),
    shard_examples: int = typer.Option(512, "--shard-examples", help="Training examples per shard file."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per teacher forward "
                                             "(default train.batch_size)."),
    answers: bool = typer.Option(False, "--answers", help="Cache the teacher's sampled answers for `method: seqkd` "
                                 "(method.max_new_tokens, method.batch_size, rollout.*) instead of log-probs."),
) -> None:
    """Run the teacher once over the training data and cache its top-k log-probs for `method: kd`
    (or, with --answers, its answers for `method: seqkd`) with `data.teacher_cache`: the run then
    loads no teacher."""

    def body() -> None:
        from minillm_cli.recipe_loading import load_recipe
        from minillm_cli.teacher_cache_command import build_cache

        path, rest = _split_recipe(recipe, overrides)
        r, _ = load_recipe(path, rest, {"models.teacher": teacher, "models.student": student, "data.train": data})
        target = out or r.data.teacher_cache
        if target is None:
            raise UserError("--out: name the cache directory (or set data.teacher_cache in the recipe)")
        build_cache(r, Path(target).expanduser(), top_k=top_k, dtype=dtype, shard_examples=shard_examples,
                    batch_size=batch_size, answers=answers, console=console, recipe_file=path)

    _guard(body)


@app.command("eval")
def eval_cmd(
    models: list[str] = typer.Argument(..., help="Checkpoints (run dir, step dir, model dir, .gguf or alias)."),
    data: str = typer.Option(..., "--data", help="Evaluation data (jsonl/json/csv/parquet or hub id) with references."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher for KL/agreement metrics (also evaluated)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma list: rougeL,em,loss,kl,agreement,exposure_bias,dist4,calibration."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma list of sampling seeds (default 10,20,30,40,50)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling (one pass, no seeds)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Evaluate the first N examples only."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="New tokens per response (default 256)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generation batch."),
    label_words: Optional[str] = typer.Option(None, "--label-words", help="Comma list of label words (calibration)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the full report as JSON to this file ('-' = stdout)."),
    samples_out: Optional[str] = typer.Option(None, "--samples", help="Write generated samples as jsonl to this file."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="Write the exposure-bias PNG plot to this file."),
    fail_under: Optional[list[str]] = typer.Option(None, "--fail-under", help="metric=value (or model:metric=value): exit 1 if below; metric@baseline=value gates the difference to --baseline (lower end of its 95% interval)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Model to compare the others with: per-metric difference with a 95% paired bootstrap interval."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="eval.* recipe overrides, e.g. --set top_p=0.9."),
) -> None:
    """Evaluate checkpoints side by side with the paper's protocol (Rouge-L over 5 seeds and more)."""

    options = dict(locals())  # the parameters are named as run_eval's keywords

    def body() -> None:
        from minillm_cli.evaluate.command import run_eval

        code = run_eval(**{**options, "fail_under": fail_under or [], "overrides": overrides or []}, console=console)
        if code:
            raise typer.Exit(code)

    _guard(body)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory or step directory to export."),
    out: Path = typer.Option(..., "--out", help="Output directory (must not exist or be empty)."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (HF directory) or gguf."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: as trained)."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Max safetensors shard size, e.g. 500MB."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Merge LoRA adapters into the base weights."),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="GGUF tensor type: f32, f16 or q8_0."),
    step: str = typer.Option("latest", "--step", help="latest, best:<metric> (e.g. best:dev/rougeL) or a step number."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload the export and compare logits with the source."),
) -> None:
    """Export a trained student as a Hugging Face safetensors directory (with model card) or GGUF."""

    def body() -> None:
        from minillm_cli.export import ExportOptions
        from minillm_cli.export import export as do_export

        if fmt not in ("safetensors", "gguf"):
            raise UserError(f"--format: must be safetensors or gguf, got {fmt!r}")
        opts = ExportOptions(out=out, format=fmt, dtype=dtype, shard_size=shard_size, merge_lora=merge,
                             gguf_type=gguf_type, step=step, overwrite=overwrite, verify=verify)
        result = do_export(run, opts, console=console)
        console.print(f"exported {result.step_dir} -> {result.out} ({len(result.files)} files)")
        if verify:
            console.print(f"verified: max |logit diff| = {result.max_abs_logit_diff:.3g} (tolerance {result.tolerance:.3g})")

    _guard(body)


@app.command()
def recipes(name: Optional[str] = typer.Argument(None, help="Show this shipped recipe.")) -> None:
    """List the shipped recipes, or print one."""
    from minillm_cli.recipe_loading import RECIPES_DIR, find_shipped, read_recipe_file, shipped_recipes

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
