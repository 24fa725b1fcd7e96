"""Every option of the `minillm` commands, declared once: its flag names, one help text, and the recipe
key it sets in the training commands. A command lists the options it takes (`option("teacher")`);
the same concept has the same spelling everywhere (`-o/--output` is the output directory of
`distill`, `sft`, `teacher-cache` and `export`; the old `--out` stays as a hidden alias).

Recipe overrides are positional `section.key=value` words in every command that reads a recipe
(`distill`, `sft`, `plan`, `teacher-cache`) and in `eval` (its `eval.*` settings).

No torch here: shell completion imports this on every TAB.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import typer

from minillm_cli.errors import UserError


class Opt(NamedTuple):
    """One option: its names, its help, the recipe key it sets (None: a switch of the command itself)."""

    names: tuple[str, ...]
    help: str
    key: str | None = None
    default: Any = None
    hidden: bool = False


MODEL_HELP = "a local model directory, a .gguf file, an alias (smollm2-135m-instruct) or a hub id"
OPTIONS: dict[str, Opt] = {
    # --- models, data, output (every command that names them)
    "teacher": Opt(("--teacher",), f"Teacher: {MODEL_HELP}.", "models.teacher"),
    "student": Opt(("--student",), f"Student (the model trained, or whose tokenizer a cache is built for): {MODEL_HELP}.",
                   "models.student"),
    "data": Opt(("--data",), "Data file (jsonl / json / csv / parquet) or hub dataset id.", "data.train"),
    "output": Opt(("--output", "-o"), "Output directory: the run (distill, sft), the cache (teacher-cache) or the "
                  "exported model (export).", "output.dir"),
    "out_alias": Opt(("--out",), "Old name of -o/--output.", hidden=True),
    "overwrite": Opt(("--overwrite",), "Replace an existing output directory that minillm wrote (never anything "
                     "else).", "output.overwrite", False),
    "json_out": Opt(("--json",), "Write the machine-readable result here (- for stdout): how a run ended "
                    "(distill, sft), or the full report (eval)."),
    "dtype": Opt(("--dtype",), "dtype of the tensors written: fp32, fp16 or bf16 (export: default as trained; "
                 "teacher-cache: default fp16)."),
    "batch_size": Opt(("--batch-size",), "Sequences per forward pass (default: eval.batch_size, or train.batch_size "
                      "for the teacher cache)."),
    "num_processes": Opt(("--num-processes",), "Processes, one per GPU (CPU processes without GPUs): started by "
                         "accelerate launch (distill, sft), or planned for (plan)."),
    # --- training runs
    "method": Opt(("--method",), "minillm (default), kd, seqkd, gkd or sft.", "method.name"),
    "max_steps": Opt(("--max-steps",), "Optimizer steps (train.max_steps).", "train.max_steps"),
    "resume": Opt(("--resume",), "Continue the run in -o from its latest intact checkpoint, with its saved recipe.",
                  default=False),
    "extend": Opt(("--extend",), "With --resume: allow a larger train.max_steps (constant schedule only).",
                  default=False),
    "dry_run": Opt(("--dry-run",), "Validate the recipe and print the memory plan; train nothing.", default=False),
    "accelerate_config": Opt(("--accelerate-config",), "accelerate config file, or ddp / fsdp / zero3 for the "
                             "shipped ones (recipes/accelerate/)."),
    "show_recipe": Opt(("--show-recipe", "-v"), "Print the whole resolved recipe (it is always written to "
                       "RUN/recipe.yaml).", default=False),
    # --- plan
    "sharding": Opt(("--sharding",), "none (a full copy per process), fsdp or zero3.", default="none"),
    "device_memory": Opt(("--device-memory",), "Memory of one device, e.g. 80GB: say whether the run fits (exit 1 "
                         "if not) and what would."),
    "activation_checkpointing": Opt(("--activation-checkpointing/--no-activation-checkpointing",),
                                    "Default: on with fsdp, off otherwise."),
    # --- teacher-cache
    "top_k": Opt(("--top-k",), "Teacher ids kept per response position (+ one tail bucket).", default=64),
    "shard_examples": Opt(("--shard-examples",), "Training examples per shard file.", default=512),
    "answers": Opt(("--answers",), "Cache the teacher's sampled answers for `method: seqkd` (method.max_new_tokens, "
                   "method.batch_size, rollout.*) instead of log-probs.", default=False),
    # --- eval
    "metrics": Opt(("--metrics",), "Comma list: rougeL,em,loss,kl,agreement,exposure_bias,dist4,calibration,length,eos."),
    "seeds": Opt(("--seeds",), "Comma list of sampling seeds (default 10,20,30,40,50)."),
    "greedy": Opt(("--greedy",), "Greedy decoding instead of sampling (one pass, no seeds).", default=False),
    "max_samples": Opt(("--max-samples",), "Evaluate the first N examples only."),
    "max_new_tokens": Opt(("--max-new-tokens",), "New tokens per response (default 256)."),
    "label_words": Opt(("--label-words",), "Comma list of label words (calibration)."),
    "samples_out": Opt(("--samples",), "Write the generated samples as jsonl to this file."),
    "plot_out": Opt(("--plot",), "Write the exposure-bias PNG plot to this file."),
    "fail_under": Opt(("--fail-under",), "metric=value (or model:metric=value): exit 1 if below; "
                      "metric@baseline=value gates the difference to --baseline (lower end of its 95% interval)."),
    "baseline": Opt(("--baseline",), "Model to compare the others with: per-metric difference with a 95% paired "
                    "bootstrap interval."),
    "set_alias": Opt(("--set",), "Old way of passing eval.* overrides (now positional key=value).", hidden=True),
    # --- export
    "format": Opt(("--format",), "safetensors (HF directory) or gguf.", default="safetensors"),
    "shard_size": Opt(("--shard-size",), "Max safetensors shard size, e.g. 500MB.", default="2GB"),
    "merge": Opt(("--merge/--no-merge",), "Merge LoRA adapters into the base weights.", default=True),
    "gguf_type": Opt(("--gguf-type",), "GGUF tensor type: f32, f16 or q8_0.", default="f16"),
    "step": Opt(("--step",), "latest, best:<metric> (e.g. best:dev/rougeL) or a step number.", default="latest"),
    "verify": Opt(("--verify/--no-verify",), "Reload the export and compare logits with the source.", default=True),
}


def option(name: str) -> Any:
    """The Typer option `name` (a command parameter's default)."""
    o = OPTIONS[name]
    return typer.Option(o.default, *o.names, help=o.help, hidden=o.hidden, show_default=o.default not in (None, False))


def required(name: str) -> Any:
    """The Typer option `name`, which this command cannot do without."""
    o = OPTIONS[name]
    return typer.Option(..., *o.names, help=o.help, hidden=o.hidden)


RECIPE_ARG = typer.Argument(None, help="Recipe YAML file or shipped recipe name; then section.key=value overrides.",
                            show_default=False)
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=1e-5 train.max_steps=20.", show_default=False)


def recipe_flags(params: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters -> {recipe key: value} for the options that set one. An unset switch is
    None: `--overwrite` absent leaves the recipe's own `output.overwrite`."""
    return {o.key: (params[name] or None) if o.default is False else params[name]
            for name, o in OPTIONS.items() if o.key is not None and name in params}


def split_recipe(recipe: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """`minillm sft optim.lr=1e-5` has no recipe: an `=` in the first word makes it an override."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe:
        return None, [recipe, *overrides]
    return recipe, overrides


def is_override(word: str) -> bool:
    """`section.key=value` (or `key=value`), as opposed to a path or model name."""
    key, sep, _ = word.partition("=")
    return bool(sep) and bool(key) and all(part.isidentifier() for part in key.split("."))


def renamed(new: Any, old: Any, flag: str) -> Any:
    """The value of an option given under its new or its old (hidden) name, not both."""
    if old is not None and new is not None and old != new:
        raise UserError(f"{flag}: given twice (also as its old name) with different values")
    return new if new is not None else old
