"""Quality study (issue 10): does the paper's ranking MiniLLM > KD, SFT hold at small scale?

One command runs the whole study; every stage is skipped when its output is already complete, so an
interrupted study resumes where it stopped (training stages continue from their last checkpoint):

    python bench/quality/run.py --out bench/out/quality --size full

Stages (all on the CPU, fp32):
  1. teacher-sft: SmolLM2-135M-Instruct fine-tuned on the task's training split first, as the paper
     does for every teacher (top 6 of 30 blocks trained, as in the quickstart);
  2. student-init: ONE layer-pruned copy of that teacher (8 of 30 blocks, evenly spaced);
  3. warmup: SFT warm-up of that student on the training split; every student below starts here;
  4. from the warmed-up student, with an EQUAL budget (same optimizer steps x sequences per step, same
     training pool, same data seed): sft, kd, seqkd, gkd, minillm and the three MiniLLM ablations
     (minillm-no-mix: teacher_mix=0; minillm-no-norm: length_norm=false; minillm-no-single:
     single_step=false);
  5. evaluation with the paper's protocol (sampling at T=1, top-k 0, top-p 1, no_repeat_ngram_size 6,
     prompts cut to their last 256 tokens) on the dev set and on the seed tasks: Rouge-L, LM loss on
     the references and the mean generated length over 5 seeds; reverse KL to the teacher on
     student-sampled text and ExAccErr (exposure bias) with the first seed on fewer rows (they cost
     ~4x a generation pass). At CPU scale responses stop at 64 new tokens (paper: 256);
  6. summary.md / summary.json (tables, target checks, timings) and one exposure-bias PNG per set.

Nothing is tuned on the evaluation sets: every hyper-parameter below is fixed before any evaluation
(learning rates and method settings are those of the shipped minillm_cli/recipes/cpu/*.yaml and quickstart.yaml),
and no dev split is used during training (data.dev_fraction 0; no dev loss, no dev eval).

Full-size step counts (SIZES["full"]) were chosen to fit about 2 hours on a 2-core CPU from the
per-step times measured by the smoke run (see bench/quality/README.md for the measurement and the
extrapolation; `--size smoke` prints the same extrapolation from the machine it runs on).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from minillm_cli import checkpoint, student_init
from minillm_cli import models as models_mod
from minillm_cli.config import validate
from minillm_cli.errors import RunStopped, UserError

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data"
TEACHER = "smollm2-135m-instruct"
SYSTEM_PROMPT = "Answer briefly."  # as in the quickstart: ~40% fewer prompt tokens than SmolLM2's default
STUDENT_LAYERS = 8
SEED = 42
EVALS = {
    # kind (report prefix) -> metrics: generation metrics over every seed, teacher metrics on the first
    "eval": "rougeL,loss",
    "div": "kl,exposure_bias",
}


@dataclass(frozen=True)
class Size:
    """How big the study is. Every training stage uses `batch_size` sequences per optimizer step."""

    teacher_sft_steps: int
    warmup_steps: int
    distill_steps: int
    """Optimizer steps of each of the eight compared students (equal budget)."""
    batch_size: int
    max_prompt_tokens: int
    max_total_tokens: int
    rollout_tokens: int
    """max_new_tokens of MiniLLM / GKD rollouts and of the SeqKD teacher answers."""
    num_rollouts: int
    """MiniLLM rollouts per buffer (with ppo_epochs 2: 2 * num_rollouts / batch_size steps per buffer)."""
    eval_samples: int
    """First N rows of each evaluation set for Rouge-L, LM loss and mean length (all seeds)."""
    div_samples: int
    """First N rows of each set for reverse KL and exposure bias (first seed only: these metrics need a
    teacher and a student forward over the vocabulary per continuation, ~4x the cost of generating)."""
    eval_seeds: tuple[int, ...]
    eval_new_tokens: int
    eval_batch_size: int


# Full size: ~2 h on 2 CPU cores. Measured on the 2-core development machine with this script at the
# full per-step shape (batch 8, <= 256 tokens, 64-token rollouts, 16 rollouts per MiniLLM buffer),
# seconds per optimizer step (MiniLLM: step + its share of a 24 s rollout buffer every 4 steps):
#   teacher-sft 4.4, warmup 3.7, sft 3.8, kd 8.3, seqkd 4.0 (+13 s of teacher answers per 16 prompts),
#   gkd 4.2, minillm 9.5, minillm-no-mix 6.6, minillm-no-norm 9.7, minillm-no-single 8.7
#   -> 40 teacher + 100 warm-up + 8 x 40 compared steps = ~50 min of training.
# Evaluation at the full shape (20 prompts, batch 20, 64 new tokens, per seed): a student generates in
# ~7 s, its reference loss ~7 s, its divergences from the teacher ~28 s; the teacher generates in ~17 s
# -> 60 rows x 5 seeds (Rouge-L, loss, length) + 40 rows x 1 seed (KL, ExAccErr) on both sets, 10
# models = ~67 min. Total ~118 min. README.md has the arithmetic.
SIZES = {
    "full": Size(teacher_sft_steps=40, warmup_steps=100, distill_steps=40, batch_size=8, max_prompt_tokens=192,
                 max_total_tokens=256, rollout_tokens=64, num_rollouts=16, eval_samples=60, div_samples=40,
                 eval_seeds=(10, 20, 30, 40, 50), eval_new_tokens=64, eval_batch_size=20),
    # Very few steps at half the batch, a tiny evaluation: checks the pipeline end to end in a few
    # minutes and measures per-step times. Its numbers are NOT results.
    "smoke": Size(teacher_sft_steps=2, warmup_steps=2, distill_steps=2, batch_size=4, max_prompt_tokens=192,
                  max_total_tokens=256, rollout_tokens=64, num_rollouts=8, eval_samples=4, div_samples=4,
                  eval_seeds=(10, 20), eval_new_tokens=16, eval_batch_size=4),
}

PPO_EPOCHS = 2
STUDENTS: dict[str, tuple[dict[str, Any], float]] = {
    # name -> (method section, learning rate); the lr of the shipped minillm_cli/recipes/cpu/<method>.yaml
    "sft": ({"name": "sft"}, 1.0e-4),
    "kd": ({"name": "kd", "kd_ratio": 0.5, "loss": "forward_kl"}, 1.0e-4),
    "seqkd": ({"name": "seqkd", "batch_size": 16}, 1.0e-4),
    "gkd": ({"name": "gkd", "beta": 0.5, "lmbda": 0.5}, 5.0e-5),
    "minillm": ({"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS}, 2.0e-5),
    "minillm-no-mix": ({"name": "minillm", "teacher_mix": 0.0, "ppo_epochs": PPO_EPOCHS}, 2.0e-5),
    "minillm-no-norm": ({"name": "minillm", "length_norm": False, "ppo_epochs": PPO_EPOCHS}, 2.0e-5),
    "minillm-no-single": ({"name": "minillm", "single_step": False, "ppo_epochs": PPO_EPOCHS}, 2.0e-5),
}
ROLLOUT_METHODS = ("minillm", "gkd", "seqkd")  # methods whose max_new_tokens is Size.rollout_tokens


# ------------------------------------------------------------------------------------ stages
def stage_done(run_dir: Path, steps: int) -> bool:
    """True when the run's newest complete checkpoint is at step `steps`."""
    last = checkpoint.latest_step_dir(run_dir)
    return last is not None and json.loads((last / "meta.json").read_text(encoding="utf-8"))["step"] >= steps


def step_times(run_dir: Path) -> list[float]:
    """Seconds of every logged optimizer step (metrics.jsonl `step_time`), in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "step_time" in rec:
            by_step[rec["step"]] = rec["step_time"]  # a resumed step overwrites its first attempt
    return [by_step[s] for s in sorted(by_step)]


class Study:
    """The study's output directory, its size, its timings file and its console."""

    def __init__(self, out: Path, size_name: str, console: Console) -> None:
        self.out = out
        self.size_name = size_name
        self.size = SIZES[size_name]
        self.console = console
        self.timings_path = out / "timings.json"
        self.timings: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)
        self._check_size()
        if self.timings_path.is_file():
            self.timings = json.loads(self.timings_path.read_text(encoding="utf-8"))

    def _check_size(self) -> None:
        """Refuse to resume a study of another size (its finished stages would be reused silently)."""
        marker = self.out / "study.json"
        wanted = {"size": self.size_name, **asdict(self.size)}
        wanted["eval_seeds"] = list(self.size.eval_seeds)
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found != wanted:
                raise UserError(f"--out {self.out}: holds a study of another size/config ({found.get('size')}); "
                                "choose another directory")
        else:
            marker.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")

    def record(self, name: str, wall_s: float, **extra: Any) -> None:
        """Save the wall time of a stage (the invocation that finished it) to timings.json."""
        self.timings[name] = {"wall_s": round(wall_s, 2), **extra}
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n", encoding="utf-8")

    def train_stage(self, name: str, tree: dict[str, Any], steps: int) -> Path:
        """Run (or resume, or skip) one training stage; returns its final step directory."""
        from minillm_cli.loop import train

        run_dir = self.out / name
        if stage_done(run_dir, steps):
            self.console.print(f"skip {name}: complete ({steps} steps)", highlight=False, markup=False)
        else:
            resume = checkpoint.latest_step_dir(run_dir) is not None
            tree = {**tree, "output": {"dir": str(run_dir), "overwrite": run_dir.exists() and not resume}}
            self.console.rule(f"{name}: {steps} steps" + (" (resuming)" if resume else ""))
            t0 = time.time()
            train(validate(tree), {}, resume=resume, console=self.console)
            times = step_times(run_dir)
            self.record(name, time.time() - t0, steps=steps, resumed=resume, step_times=[round(t, 3) for t in times])
        final = checkpoint.latest_step_dir(run_dir)
        assert final is not None  # stage_done or a finished train() left a checkpoint
        return final

    def data(self, train: str, pool: int | None = None) -> dict[str, Any]:
        """The data section shared by every stage; `pool` caps the training rows (first N)."""
        s = self.size
        tree: dict[str, Any] = {"train": train, "dev_fraction": 0.0, "system_prompt": SYSTEM_PROMPT,
                                "max_prompt_tokens": s.max_prompt_tokens, "max_total_tokens": s.max_total_tokens}
        if pool is not None:
            tree["max_train_samples"] = pool
        return tree

    def eval_stage(self, kind: str, set_name: str, data: str, models: dict[str, Path], teacher: Path) -> Path:
        """One evaluation of the teacher and `models` on one set; skipped when its report exists.

        kind "eval": Rouge-L and LM loss over `eval_seeds` on `eval_samples` rows (+ the samples file
        for the mean length); kind "div": reverse KL and exposure bias with the first seed on the first
        `div_samples` rows.
        """
        from minillm_cli.evaluate.command import run_eval

        s = self.size
        report = self.out / f"{kind}-{set_name}.json"
        samples = self.out / f"samples-{set_name}.jsonl" if kind == "eval" else None
        if report.is_file():
            self.console.print(f"skip {kind} {set_name}: {report} exists", highlight=False, markup=False)
            return report
        seeds = s.eval_seeds if kind == "eval" else s.eval_seeds[:1]
        n = s.eval_samples if kind == "eval" else s.div_samples
        self.console.rule(f"{kind} on {set_name} ({data}): {EVALS[kind]}, {n} rows, seeds {list(seeds)}")
        partial = report.with_suffix(".json.partial")
        partial_samples = samples.with_suffix(".jsonl.partial") if samples else None
        t0 = time.time()
        run_eval(models=[str(p) for p in models.values()], data=data, teacher=str(teacher), metrics=EVALS[kind],
                 seeds=",".join(map(str, seeds)), max_samples=n, max_new_tokens=s.eval_new_tokens,
                 batch_size=s.eval_batch_size, json_out=str(partial),
                 samples_out=str(partial_samples) if partial_samples else None,
                 overrides=[f"system_prompt={json.dumps(SYSTEM_PROMPT)}"], console=self.console)
        if samples and partial_samples:
            partial_samples.replace(samples)
        partial.replace(report)  # last: the report's presence marks the stage complete
        self.record(f"{kind}-{set_name}", time.time() - t0, models=len(models) + 1, samples=n, seeds=len(seeds),
                    new_tokens=s.eval_new_tokens, batch_size=s.eval_batch_size)
        return report


def run_study(out: Path, size_name: str, train: str, dev: str, seed_tasks: str, console: Console) -> dict[str, Any]:
    """Run every stage of the study (skipping complete ones) and write the summary; returns it."""
    for path in (train, dev, seed_tasks):
        if not Path(path).is_file():
            raise UserError(f"data file not found: {path} (pass --train/--dev/--seed-tasks)")
    study = Study(out, size_name, console)
    s = study.size
    t_start = time.time()

    # 1. The teacher, fine-tuned on the task first (its top 6 blocks, as in the quickstart).
    base = models_mod.resolve_model(TEACHER)
    teacher = study.train_stage("teacher-sft", {
        "models": {"student": str(base), "trainable_layers": 6}, "data": study.data(train), "method": {"name": "sft"},
        "optim": {"lr": 3.0e-4, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"max_steps": s.teacher_sft_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
    }, s.teacher_sft_steps)

    # 2. One student init: an evenly spaced 8-of-30-layer copy of the fine-tuned teacher.
    init_dir = out / "student-init"
    if not (init_dir / "config.json").is_file():  # written atomically by init_student_from_teacher
        student_init.init_student_from_teacher(teacher, init_dir, keep=STUDENT_LAYERS)

    # 3. SFT warm-up of that student (all 8 blocks; embeddings shared with the teacher stay frozen).
    warm = study.train_stage("warmup", {
        "models": {"student": str(init_dir), "trainable_layers": STUDENT_LAYERS}, "data": study.data(train),
        "method": {"name": "sft"}, "optim": {"lr": 5.0e-4, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"max_steps": s.warmup_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
    }, s.warmup_steps)

    # 4. The compared students: same init, same pool, same data seed, same steps x sequences.
    pool = s.distill_steps * s.batch_size
    students: dict[str, Path] = {"warm-up (init)": warm}
    for name, (method, lr) in STUDENTS.items():
        method = dict(method)
        if method["name"] in ROLLOUT_METHODS:
            method["max_new_tokens"] = s.rollout_tokens
        if method["name"] == "minillm":
            method["num_rollouts"] = s.num_rollouts
        models = {"student": str(warm), "trainable_layers": STUDENT_LAYERS}
        if method["name"] != "sft":
            models["teacher"] = str(teacher)
        students[name] = study.train_stage(name, {
            "models": models, "data": study.data(train, pool), "method": method,
            "rollout": {"batch_size": 16}, "optim": {"lr": lr, "warmup_steps": 5},
            "train": {"max_steps": s.distill_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
        }, s.distill_steps)

    # 5. Evaluation on both held-out sets.
    sets = {"dev": dev, "seed-tasks": seed_tasks}
    for set_name, path in sets.items():
        for kind in EVALS:
            study.eval_stage(kind, set_name, path, students, teacher)
    console.print(f"study stages took {time.time() - t_start:.0f}s in this invocation")

    # 6. Summary.
    summary = summarize(study, list(sets), students, teacher)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
    console.print(render_markdown(summary), markup=False, highlight=False)
    console.print(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------------- summary
def mean_lengths(samples: Path, tokenizer: Any) -> dict[str, float]:
    """Mean generated length in tokens per model (all seeds): the response text re-tokenised."""
    counts: dict[str, list[int]] = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        counts.setdefault(row["model"], []).append(len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]))
    return {name: statistics.fmean(v) for name, v in counts.items()}


def summarize(study: Study, set_names: list[str], students: dict[str, Path], teacher: Path) -> dict[str, Any]:
    """Collect the reports into one dict: per set and model the table's numbers, target checks, timings."""
    from minillm_cli.evaluate import report as report_mod

    tokenizer = models_mod.load_tokenizer(teacher)
    label_of = {str(p): label for label, p in students.items()}
    label_of[f"{teacher} (teacher)"] = "teacher (fine-tuned)"
    sets: dict[str, Any] = {}
    for set_name in set_names:
        gen = json.loads((study.out / f"eval-{set_name}.json").read_text(encoding="utf-8"))
        div = json.loads((study.out / f"div-{set_name}.json").read_text(encoding="utf-8"))
        lengths = mean_lengths(study.out / f"samples-{set_name}.jsonl", tokenizer)
        div_metrics = {model["name"]: model["metrics"] for model in div["models"]}
        rows: dict[str, Any] = {}
        for model in gen["models"]:
            m, d = model["metrics"], div_metrics.get(model["name"], {})
            exacc = next((k for k in d if k.startswith("exaccerr@")), None)
            rows[label_of.get(model["name"], model["name"])] = {
                "rougeL": m.get("rougeL"), "loss": m.get("loss"), "rkl_student": d.get("rkl_student"),
                "exaccerr": d.get(exacc) if exacc else None, "exaccerr_at": exacc,
                "mean_length": lengths.get(model["name"]),
            }
        settings = gen["settings"]
        sets[set_name] = {"path": settings["data"]["path"], "examples": settings["data"]["examples"],
                          "seeds": settings["seeds"], "div_examples": div["settings"]["data"]["examples"],
                          "div_seeds": div["settings"]["seeds"], "rows": rows}
        report = report_mod.from_json(div)
        for row in report.rows:
            row.name = label_of.get(row.name, row.name)
        report_mod.plot_exposure_bias(report, study.out / f"exposure-bias-{set_name}.png")
    summary = {
        "size": study.size_name,
        "is_result": study.size_name == "full",
        "config": {**asdict(study.size), "students": {k: {"method": v[0], "lr": v[1]} for k, v in STUDENTS.items()}},
        "sets": sets,
        "targets": check_targets(sets),
        "timings": study.timings,
    }
    if study.size_name != "full":
        summary["extrapolated_full"] = extrapolate(study.timings, study.size, SIZES["full"])
    return summary


def _mean(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return None if v is None or v.get("mean") is None else v["mean"]


def check_targets(sets: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: MiniLLM >= KD + 1 Rouge-L and >= SFT on each set; ExAccErr below KD's."""
    checks = []
    for set_name, block in sets.items():
        rows = block["rows"]
        mini, kd, sft = rows["minillm"], rows["kd"], rows["sft"]
        pairs = [
            ("rougeL(minillm) >= rougeL(kd) + 1", _mean(mini, "rougeL"), _mean(kd, "rougeL"), 1.0, True),
            ("rougeL(minillm) >= rougeL(sft)", _mean(mini, "rougeL"), _mean(sft, "rougeL"), 0.0, True),
            (f"{mini['exaccerr_at']}(minillm) < same(kd)", _mean(mini, "exaccerr"), _mean(kd, "exaccerr"), 0.0, False),
        ]
        for text, a, b, margin, higher in pairs:
            ok = None if a is None or b is None else (a >= b + margin if higher else a < b)
            checks.append({"set": set_name, "target": text, "minillm": a, "other": b, "met": ok})
    return checks


def extrapolate(timings: dict[str, Any], measured: Size, target: Size) -> dict[str, Any]:
    """A rough (low, high) wall-time range per stage at `target` size from the times measured at `measured`.

    Training (low = high): time outside the steps (loading, saving) is kept; the mean step time is
    scaled by the batch-size ratio and by the step count. MiniLLM's first step also collects a rollout
    buffer: collect = t(step 1) - mean t(later steps), charged once per buffer of the target. SeqKD's
    teacher generation (its time outside the steps beyond KD's) is scaled by the pool size. Linear in
    the batch is optimistic: a larger batch also pads to a longer longest row.
    Evaluation: per seed, linear in new tokens; low = linear in the number of batches (a batch of 20
    costs what a batch of 4 does), high = linear in the number of rows (no batching gain).
    """
    est: dict[str, tuple[float, float]] = {}
    per_step: dict[str, float] = {}
    outside: dict[str, float] = {}
    batch_ratio = target.batch_size / measured.batch_size
    steps_of = {"teacher-sft": target.teacher_sft_steps, "warmup": target.warmup_steps}
    steps_of.update({name: target.distill_steps for name in STUDENTS})
    for name, n_target in steps_of.items():
        t = timings.get(name)
        if not t or not t["step_times"]:
            continue
        times = t["step_times"]
        outside[name] = max(t["wall_s"] - sum(times), 0.0)
        method = STUDENTS.get(name, ({"name": "sft"}, 0.0))[0]["name"]
        if method == "minillm" and len(times) > 1:
            rest = statistics.fmean(times[1:])
            collect = max(times[0] - rest, 0.0)
            buffers = math.ceil(n_target / math.ceil(PPO_EPOCHS * target.num_rollouts / target.batch_size))
            step_part = batch_ratio * (rest * n_target + collect * buffers)
        else:
            step_part = batch_ratio * statistics.fmean(times) * n_target
        per_step[name] = step_part / n_target
        est[name] = (outside[name] + step_part,) * 2
    if "seqkd" in est and "kd" in outside:
        generation = max(outside["seqkd"] - outside["kd"], 0.0)
        pool_ratio = (target.distill_steps * target.batch_size) / (measured.distill_steps * measured.batch_size)
        est["seqkd"] = tuple(v + generation * (pool_ratio - 1.0) for v in est["seqkd"])  # type: ignore[assignment]
    for key, t in timings.items():
        kind = key.split("-")[0]
        if kind in EVALS:
            rows = target.eval_samples if kind == "eval" else target.div_samples
            seeds = len(target.eval_seeds) if kind == "eval" else 1
            per_seed = t["wall_s"] * (seeds / t["seeds"]) * (target.eval_new_tokens / t["new_tokens"])
            batches = math.ceil(rows / target.eval_batch_size) / math.ceil(t["samples"] / t["batch_size"])
            est[key] = (per_seed * batches, per_seed * rows / t["samples"])
    return {"stages_s": {k: [round(lo, 1), round(hi, 1)] for k, (lo, hi) in est.items()},
            "per_step_s": {k: round(v, 2) for k, v in per_step.items()},
            "total_s": [round(sum(lo for lo, _ in est.values()), 1), round(sum(hi for _, hi in est.values()), 1)]}


def _cell(v: dict[str, Any] | None, decimals: int = 2) -> str:
    if not v or v.get("mean") is None:
        return "-"
    text = f"{v['mean']:.{decimals}f}"
    return text + (f" ± {v['std']:.{decimals}f}" if v.get("std") is not None else "")


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: one table per set, the target checks, the timings."""
    smoke = not summary["is_result"]
    lines = [f"# Quality study: {summary['size']} size" + (" (SMOKE RUN: pipeline check, NOT results)" if smoke else ""), ""]
    if smoke:
        lines += ["These numbers come from a few optimizer steps and a handful of evaluation prompts; they only show "
                  "that every stage runs. Do not read any ranking into them.", ""]
    for set_name, block in summary["sets"].items():
        at = next((r["exaccerr_at"] for r in block["rows"].values() if r["exaccerr_at"]), "exaccerr")
        lines += [f"## {set_name}: {block['path']}", "",
                  f"Rouge-L, LM loss, mean length: first {block['examples']} rows, seeds {block['seeds']} (mean ± std "
                  f"over seeds). Reverse KL KL(q‖p) on student-sampled text and ExAccErr: first {block['div_examples']} "
                  f"rows, seed {block['div_seeds'][0]}.", "",
                  f"| model | Rouge-L | LM loss | reverse KL | {at} (%) | mean length (tokens) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in block["rows"].items():
            length = "-" if r["mean_length"] is None else f"{r['mean_length']:.1f}"
            lines.append(f"| {name} | {_cell(r['rougeL'])} | {_cell(r['loss'], 3)} | {_cell(r['rkl_student'], 3)} | "
                         f"{_cell(r['exaccerr'], 1)} | {length} |")
        lines.append("")
    lines += ["## Targets (issue 10)", "", "| set | target | minillm | other | met |", "|---|---|---:|---:|---|"]
    for c in summary["targets"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        met = "-" if c["met"] is None else ("yes" if c["met"] else "no")
        lines.append(f"| {c['set']} | {c['target']} | {fmt(c['minillm'])} | {fmt(c['other'])} | {met}{' (smoke)' if smoke else ''} |")
    lines += ["", "## Timings (this machine)", "", "| stage | wall s | steps | mean s/step |", "|---|---:|---:|---:|"]
    for name, t in summary["timings"].items():
        times = t.get("step_times") or []
        mean = f"{statistics.fmean(times):.2f}" if times else "-"
        lines.append(f"| {name} | {t['wall_s']:.1f} | {t.get('steps', '-')} | {mean} |")
    if "extrapolated_full" in summary:
        e = summary["extrapolated_full"]
        low, high = e["total_s"]
        lines += ["", f"## Rough full-size time extrapolated from this run: {low / 60:.0f}-{high / 60:.0f} min", "",
                  "Training: linear in batch size and steps (optimistic); evaluation: between linear in batches "
                  "and linear in rows (see `extrapolate` in run.py).", "",
                  "| stage | estimated s (low-high) | estimated s/step |", "|---|---:|---:|"]
        for name, (lo, hi) in e["stages_s"].items():
            span = f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"
            lines.append(f"| {name} | {span} | {e['per_step_s'].get(name, '-')} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Command line: parse the arguments, run the study, print the summary. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "quality", help="study directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--train", default=str(DATA_DIR / "instruct-train.jsonl"))
    parser.add_argument("--dev", default=str(DATA_DIR / "instruct-dev.jsonl"))
    parser.add_argument("--seed-tasks", default=str(DATA_DIR / "seed-tasks.jsonl"))
    args = parser.parse_args(argv)
    console = Console()
    resume_hint = f"run the same command again to resume: python {' '.join(sys.argv)}"
    try:
        run_study(args.out, args.size, args.train, args.dev, args.seed_tasks, console)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except RunStopped as e:  # a training stage saved its last step on SIGINT / SIGTERM
        console.print(f"{e}\n{resume_hint}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:  # during an evaluation: its partial report is discarded on resume
        console.print(f"interrupted\n{resume_hint}", highlight=False)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
