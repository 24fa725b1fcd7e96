"""Quality study (issue 20): does MiniLLM give a better student than SFT, KD, SeqKD and GKD?

One command runs a whole study; every stage is skipped when its output is already complete, so an
interrupted study resumes where it stopped (training stages continue from their last checkpoint):

    python bench/quality/run.py --study builtin --out bench/out/quality-builtin
    python bench/quality/run.py --study shared  --out bench/out/quality-shared

Two studies, same arms, same protocol, different data:
  builtin  the package's task data (recipes/data/quickstart-*.jsonl) at the quickstart's
           shapes, evaluated on its held-out test split (the teacher reaches ~66 Rouge-L there);
  shared   ../shared/data/instruct-train.jsonl, evaluated on instruct-dev.jsonl and seed-tasks.jsonl.

Stages (all on the CPU, fp32):
  1. teacher-sft: SmolLM2-135M-Instruct fine-tuned on the training file first (the paper fine-tunes
     every teacher on the task; its top 6 of 30 blocks train);
  2. student-init: ONE layer-pruned copy of that teacher (8 of 30 blocks, evenly spaced);
  3. warmup: SFT of that student; every compared arm starts from this checkpoint;
  4. the arms, from the warm-up with an EQUAL budget (same optimizer steps × sequences, same pool of
     training rows, same data seed): `sft-continued` (the control: the same extra budget spent on
     more SFT), `kd`, `seqkd`, `gkd`, `minillm` (the reference default that counts the current
     token's reward in its return, include_current=true), `minillm-exact` (the paper's return,
     include_current=false) and, when the installed minillm has it, `minillm-resp` (a variant beyond
     the paper: MiniLLM plus GKD's JSD on the dataset's own responses, `method.response_weight`).
     Ablation and diagnostic arms are chosen with `--arms` (see ARMS);
  5. evaluation per set and model with the paper's protocol (sampling at T=1, no top-k/top-p,
     no_repeat_ngram_size 6): Rouge-L and LM loss on the references over several seeds (one report
     per model, so an arm added later costs only its own evaluation); reverse KL to the teacher on
     student-sampled text and ExAccErr (exposure bias) on fewer rows with the first seed;
  6. summary.md / summary.json: per set, Rouge-L with 95% paired bootstrap intervals (prompts
     resampled, seeds kept together) of every arm against sft-continued and against kd, LM loss,
     reverse KL, mean length, Dist-4, ExAccErr (+ plot), Rouge-L by reference-length bucket, the
     targets, the MiniLLM arms' training diagnostics (reward, KL, clip fraction, gradient norm per
     buffer) and the timings.

Nothing is tuned on the evaluation sets: every setting below was fixed before any evaluation, and no
dev split is used during training (data.dev_fraction 0). Hyper-parameters are chosen on a dev split
carved from the training data, never on a held-out set: the built-in data has one
(recipes/data/quickstart-dev.jsonl), e.g.

    python bench/quality/run.py --study builtin --arms minillm,minillm-lr5e-5,minillm-lr1e-4 \
        --eval-set builtin-dev=recipes/data/quickstart-dev.jsonl

writes summary-builtin-dev.md beside the held-out sets' summary.md.

Every minillm module the study uses is imported when it starts: a study runs for hours, and a module
first imported hours later from a since-edited package (a mix of old and new code) once broke one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from minillm_cli.config.methods import MiniLlmMethod
from minillm_cli.config.validation import validate
from minillm_cli.errors import RunStopped, UserError
from minillm_cli.evaluate import metrics as metrics_mod
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate import report_json
from minillm_cli.evaluate.command import run_eval
from minillm_cli.models import loading as models_mod
from minillm_cli.models import student_init
from minillm_cli.runs import checkpoint
from minillm_cli.runs.resume_check import file_sha256
from minillm_cli.train.loop import train as train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping  # noqa: E402  (bench/quality/stopping.py: length, EOS calibration, RQ5)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
BUILTIN_DATA = REPO / "recipes" / "data"
TEACHER = "smollm2-135m-instruct"
SYSTEM_PROMPT = "Answer briefly."  # as in the quickstart: ~40% fewer prompt tokens than SmolLM2's default
STUDENT_LAYERS = 8
SEED = 42
PPO_EPOCHS = 2
CONTROL, KD = "sft-continued", "kd"  # the two rows every arm is compared with


@dataclass(frozen=True)
class Setup:
    """Everything that decides what the study trains and how it evaluates (saved in study.json)."""

    train: str
    max_prompt_tokens: int
    max_total_tokens: int
    teacher_sft_steps: int
    teacher_sft_lr: float
    warmup_steps: int
    warmup_lr: float
    batch_size: int
    """Sequences per optimizer step of every training stage."""
    arm_steps: int
    """Optimizer steps of every compared arm (equal budget)."""
    rollout_tokens: int
    """max_new_tokens of MiniLLM / GKD rollouts and of the SeqKD teacher answers."""
    num_rollouts: int
    """MiniLLM rollouts per buffer (with ppo_epochs 2: 2 × num_rollouts / batch_size steps per buffer)."""
    lr: dict[str, float]
    """Learning rate per method name (sft, kd, seqkd, gkd, minillm), fixed before any evaluation."""
    eval_samples: int | None
    """First N rows of each set for Rouge-L, LM loss, length, Dist-4 (all seeds); None = all rows."""
    div_samples: int
    """First N rows of each set for reverse KL and ExAccErr (first seed: ~4x the cost of generating)."""
    eval_seeds: tuple[int, ...]
    eval_new_tokens: int
    eval_batch_size: int


# builtin: the quickstart's task and shapes (recipes/quickstart.yaml), with the arms' budget
# of issue 20's equal-budget comparison (48 steps × 16 sequences) and learning rates: sft, kd, seqkd,
# gkd 5e-5; minillm 2e-5 (the shipped cpu/minillm.yaml). All 204 test rows × 3 seeds: the interval of
# a Rouge-L difference is about ±1.2 there (issue 20 measured ±1.5 on 128 rows).
BUILTIN = Setup(
    train=str(BUILTIN_DATA / "quickstart-train.jsonl"), max_prompt_tokens=96, max_total_tokens=160,
    teacher_sft_steps=30, teacher_sft_lr=4.0e-4, warmup_steps=80, warmup_lr=5.0e-4, batch_size=16,
    arm_steps=48, rollout_tokens=32, num_rollouts=32,
    lr={"sft": 5.0e-5, "kd": 5.0e-5, "seqkd": 5.0e-5, "gkd": 5.0e-5, "minillm": 2.0e-5},
    eval_samples=None, div_samples=64, eval_seeds=(10, 20, 30), eval_new_tokens=32, eval_batch_size=16,
)
# shared: the instruction data of ../shared/data at the paper-like shapes of issue 10's study (prompts
# <= 192 tokens, 64-token responses), learning rates of the shipped recipes/cpu/*.yaml.
SHARED = Setup(
    train=str(SHARED_DATA / "instruct-train.jsonl"), max_prompt_tokens=192, max_total_tokens=256,
    teacher_sft_steps=40, teacher_sft_lr=3.0e-4, warmup_steps=100, warmup_lr=5.0e-4, batch_size=8,
    arm_steps=40, rollout_tokens=64, num_rollouts=16,
    lr={"sft": 1.0e-4, "kd": 1.0e-4, "seqkd": 1.0e-4, "gkd": 5.0e-5, "minillm": 2.0e-5},
    eval_samples=120, div_samples=40, eval_seeds=(10, 20, 30), eval_new_tokens=64, eval_batch_size=20,
)
STUDIES = {"builtin": BUILTIN, "shared": SHARED}
DEFAULT_SETS = {
    "builtin": {"test": BUILTIN_DATA / "quickstart-test.jsonl"},
    "shared": {"dev": SHARED_DATA / "instruct-dev.jsonl", "seed-tasks": SHARED_DATA / "seed-tasks.jsonl"},
}


def smoke(setup: Setup) -> Setup:
    """A few steps at batch 4 and a tiny evaluation: checks the pipeline end to end. NOT results."""
    return replace(setup, teacher_sft_steps=2, warmup_steps=2, batch_size=4, arm_steps=2, num_rollouts=8,
                   eval_samples=4, div_samples=4, eval_seeds=(10, 20), eval_new_tokens=16, eval_batch_size=4)


# Arm name -> method section (the learning rate is Setup.lr[method name]). Default arms: DEFAULT_ARMS.
ARMS: dict[str, dict[str, Any]] = {
    CONTROL: {"name": "sft"},
    KD: {"name": "kd", "kd_ratio": 0.5, "loss": "forward_kl"},
    "seqkd": {"name": "seqkd", "batch_size": 16},
    "gkd": {"name": "gkd", "beta": 0.5, "lmbda": 0.5},
    # `minillm` is the paper's MiniLLM and minillm's default (length normalisation on; `minillm-no-norm` was the
    # shipped default for a while in issue 31): every arm states length_norm explicitly, so defaults never move a study
    "minillm": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "minillm-exact": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "include_current": False, "length_norm": True},
    "minillm-resp": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": True,
                     "response_weight": 1.0, "response_beta": 0.5},
    # ablations (paper Table 6) and diagnostics, by --arms only
    "minillm-no-mix": {"name": "minillm", "teacher_mix": 0.0, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "minillm-no-norm": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": False},
    "minillm-no-single": {"name": "minillm", "single_step": False, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "gkd-onpolicy-rkl": {"name": "gkd", "beta": 1.0, "lmbda": 1.0},  # = MiniLLM's L_reg alone, on q samples
    "gkd-offpolicy": {"name": "gkd", "beta": 0.5, "lmbda": 0.0},  # JSD on the dataset's responses only
    # learning-rate candidates for MiniLLM, to be chosen on a dev split (never on a test set)
    "minillm-lr5e-5": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "minillm-lr1e-4": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    # length drift and RQ5 (issue 31): teacher-mix strength, the pre-training loss, and the fixes (with minillm-no-norm)
    "minillm-mix0.5": {"name": "minillm", "teacher_mix": 0.5, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "minillm-pt": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "pt_weight": 1.0, "length_norm": True},
    "minillm-long": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "length_norm": True},
    "minillm-discnorm": {"name": "minillm", "teacher_mix": 0.2, "ppo_epochs": PPO_EPOCHS, "discounted_norm": True, "length_norm": True},
}
ARM_LR: dict[str, float] = {"minillm-lr5e-5": 5.0e-5, "minillm-lr1e-4": 1.0e-4}
"""Arms trained at a learning rate other than Setup.lr[method name]."""
ARM_DATA: dict[str, dict[str, Any]] = {"minillm-pt": {"corpus": str(SHARED_DATA / "pretrain.txt")}}
"""Arms whose data section adds keys (the pre-training loss reads data.corpus)."""
ARM_ROLLOUT_TOKENS: dict[str, int] = {"minillm-long": 192}
"""Arms whose rollouts get another token budget than Setup.rollout_tokens (truncation rare)."""
DRIFT_ARMS = [CONTROL, KD, "gkd", "minillm", "minillm-no-mix", "minillm-mix0.5", "minillm-pt", "minillm-long",
              "minillm-discnorm", "minillm-no-norm"]
"""The arms of the length-drift study (issue 31): `--arms drift`."""
DEFAULT_ARMS = [CONTROL, KD, "seqkd", "gkd", "minillm", "minillm-no-norm", "minillm-exact", "minillm-resp"]
ROLLOUT_METHODS = ("minillm", "gkd", "seqkd")  # methods whose max_new_tokens is Setup.rollout_tokens


def arm_available(name: str) -> bool:
    """An arm needs every key of its method section in the installed minillm's schema."""
    method = ARMS[name]
    return method["name"] != "minillm" or all(k in MiniLlmMethod.model_fields for k in method)


def arm_lr(setup: Setup, name: str) -> float:
    """The arm's learning rate: its own (ARM_LR) or its method's (Setup.lr)."""
    return ARM_LR.get(name, setup.lr[ARMS[name]["name"]])


# ------------------------------------------------------------------------------------ stages
def stage_done(run_dir: Path, steps: int) -> bool:
    """True when the run's newest complete checkpoint is at step `steps`."""
    last = checkpoint.latest_step_dir(run_dir)
    return last is not None and json.loads((last / "meta.json").read_text(encoding="utf-8"))["step"] >= steps


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records, one per step (a resumed step replaces its first attempt)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "step_time" in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


class Study:
    """The study's output directory, its setup, its timings file and its console."""

    def __init__(self, out: Path, name: str, setup: Setup, size: str, console: Console) -> None:
        self.out, self.name, self.setup, self.size, self.console = out, name, setup, size, console
        self.timings_path = out / "timings.json"
        self.timings: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)
        self._check_setup()
        if self.timings_path.is_file():
            self.timings = json.loads(self.timings_path.read_text(encoding="utf-8"))

    def _check_setup(self) -> None:
        """Refuse to resume a study of another setup (its finished stages would be reused silently)."""
        marker = self.out / "study.json"
        wanted = json.loads(json.dumps({"study": self.name, "size": self.size, **asdict(self.setup)}))
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found != wanted:
                keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise UserError(f"--out {self.out}: holds a study with other settings ({', '.join(keys)}); "
                                "choose another directory")
        else:
            marker.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")

    def record(self, name: str, wall_s: float, **extra: Any) -> None:
        """Save the wall time of a stage (the invocation that finished it) to timings.json."""
        self.timings[name] = {"wall_s": round(wall_s, 2), **extra}
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n", encoding="utf-8")

    def train_stage(self, name: str, tree: dict[str, Any], steps: int, train: bool) -> Path | None:
        """Run (or resume, or skip) one training stage; returns its final step directory.

        With `train` False (--eval-only) nothing trains: a complete stage is returned, else None."""
        run_dir = self.out / name
        if stage_done(run_dir, steps):
            self.console.print(f"skip {name}: complete ({steps} steps)", highlight=False, markup=False)
        elif not train:
            self.console.print(f"{name}: not trained yet (--eval-only): left out", highlight=False, markup=False)
            return None
        else:
            resume = checkpoint.latest_step_dir(run_dir) is not None
            tree = {**tree, "output": {"dir": str(run_dir), "overwrite": run_dir.exists() and not resume}}
            self.console.rule(f"{name}: {steps} steps" + (" (resuming)" if resume else ""))
            t0 = time.time()
            train_run(validate(tree), {}, resume=resume, console=self.console)
            times = [r["step_time"] for r in read_metrics(run_dir)]
            self.record(name, time.time() - t0, steps=steps, resumed=resume, step_times=[round(t, 3) for t in times])
        return checkpoint.latest_step_dir(run_dir)

    def data(self, pool: int | None = None) -> dict[str, Any]:
        """The data section shared by every stage; `pool` caps the training rows (first N)."""
        s = self.setup
        tree: dict[str, Any] = {"train": s.train, "dev_fraction": 0.0, "system_prompt": SYSTEM_PROMPT,
                                "max_prompt_tokens": s.max_prompt_tokens, "max_total_tokens": s.max_total_tokens}
        if pool is not None:
            tree["max_train_samples"] = pool
        return tree

    def set_dir(self, set_name: str, path: Path) -> Path:
        """eval/<set>/, bound to one data file: the same name given another file is refused."""
        d = self.out / "eval" / set_name
        d.mkdir(parents=True, exist_ok=True)
        marker = d / "set.json"
        wanted = {"path": str(path), "sha256": file_sha256(path)}
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found["sha256"] != wanted["sha256"]:
                raise UserError(f"--eval-set {set_name}={path}: this study evaluated another file under that name "
                                f"({found['path']}); give the set another name")
        else:
            marker.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        return d

    def _eval(self, label: str, report: Path, samples: Path | None, **kwargs: Any) -> None:
        """run_eval into `.partial` files, renamed when complete (the report's presence marks it done)."""
        s = self.setup
        partial = report.with_suffix(".json.partial")
        partial_samples = samples.with_suffix(".jsonl.partial") if samples else None
        t0 = time.time()
        run_eval(max_new_tokens=s.eval_new_tokens, batch_size=s.eval_batch_size, json_out=str(partial),
                 samples_out=str(partial_samples) if partial_samples else None,
                 overrides=[f"system_prompt={json.dumps(SYSTEM_PROMPT)}"], console=self.console, **kwargs)
        if samples and partial_samples:
            partial_samples.replace(samples)
        partial.replace(report)
        self.record(label, time.time() - t0, samples=kwargs.get("max_samples"), seeds=kwargs["seeds"],
                    new_tokens=s.eval_new_tokens, batch_size=s.eval_batch_size)

    def eval_model(self, set_name: str, path: Path, model_name: str, model: Path) -> None:
        """Rouge-L and LM loss of one model over every seed (+ its generations); skipped when done."""
        d = self.set_dir(set_name, path)
        report = d / f"{model_name}.json"
        if report.is_file():
            return
        s = self.setup
        self.console.rule(f"eval {model_name} on {set_name}: rougeL, loss, seeds {list(s.eval_seeds)}")
        self._eval(f"eval-{set_name}-{model_name}", report, d / f"{model_name}.samples.jsonl", models=[str(model)],
                   data=str(path), metrics="rougeL,loss", seeds=",".join(map(str, s.eval_seeds)),
                   max_samples=s.eval_samples)

    def eval_divergences(self, set_name: str, path: Path, models: dict[str, Path], teacher: Path) -> Path:
        """Reverse KL to the teacher and ExAccErr of `models` (one pass: the teacher samples once);
        redone when the set of models changed (an arm was added)."""
        d = self.set_dir(set_name, path)
        report = d / "divergences.json"
        names = sorted(models)
        if report.is_file() and json.loads(report.read_text(encoding="utf-8")).get("study_models") == names:
            return report
        s = self.setup
        metrics = "kl,exposure_bias,eos,length"
        self.console.rule(f"divergences on {set_name}: {metrics}, {s.div_samples} rows, seed {s.eval_seeds[0]}")
        baseline = [str(models["minillm"])] if "minillm" in models else None  # arms against the default
        self._eval(f"div-{set_name}", report, None, models=[str(models[n]) for n in names], data=str(path),
                   teacher=str(teacher), metrics=metrics, seeds=str(s.eval_seeds[0]), max_samples=s.div_samples,
                   baseline=baseline)
        data = json.loads(report.read_text(encoding="utf-8"))
        data["study_models"] = names
        report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return report


def run_study(study: Study, arms: list[str], sets: dict[str, Path], train: bool) -> dict[str, Any]:
    """Run every stage of the study (skipping complete ones) and write the summary; returns it."""
    s, out, console = study.setup, study.out, study.console
    for path in [Path(s.train), *sets.values()]:
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
    t_start = time.time()

    # 1. The teacher, fine-tuned on the task first (its top 6 blocks).
    teacher = study.train_stage("teacher-sft", {
        "models": {"student": str(models_mod.resolve_model(TEACHER)), "trainable_layers": 6},
        "data": study.data(), "method": {"name": "sft"},
        "optim": {"lr": s.teacher_sft_lr, "warmup_steps": 4, "weight_decay": 0.0},
        "train": {"max_steps": s.teacher_sft_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
    }, s.teacher_sft_steps, train)
    if teacher is None:
        raise UserError(f"--eval-only: {out / 'teacher-sft'} is not complete; run the study without --eval-only first")

    # 2. One student init: an evenly spaced 8-of-30-layer copy of the fine-tuned teacher.
    init_dir = out / "student-init"
    if not (init_dir / "config.json").is_file():  # written atomically by init_student_from_teacher
        student_init.init_student_from_teacher(teacher, init_dir, keep=STUDENT_LAYERS)

    # 3. SFT warm-up of that student (all 8 blocks; embeddings shared with the teacher stay frozen).
    warm = study.train_stage("warmup", {
        "models": {"student": str(init_dir), "trainable_layers": STUDENT_LAYERS}, "data": study.data(),
        "method": {"name": "sft"}, "optim": {"lr": s.warmup_lr, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"max_steps": s.warmup_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
    }, s.warmup_steps, train)
    if warm is None:
        raise UserError(f"--eval-only: {out / 'warmup'} is not complete; run the study without --eval-only first")

    # 4. The arms: same init, same pool, same data seed, same steps × sequences.
    students: dict[str, Path] = {"warm-up start": warm}
    for name in arms:
        method = dict(ARMS[name])
        if method["name"] in ROLLOUT_METHODS:
            method["max_new_tokens"] = ARM_ROLLOUT_TOKENS.get(name, s.rollout_tokens)
        if method["name"] == "minillm":
            method["num_rollouts"] = s.num_rollouts
        models = {"student": str(warm), "trainable_layers": STUDENT_LAYERS}
        if method["name"] != "sft":
            models["teacher"] = str(teacher)
        final = study.train_stage(name, {
            "models": models, "data": {**study.data(s.arm_steps * s.batch_size), **ARM_DATA.get(name, {})},
            "method": method,
            # Lockstep sampling, as when bench/QUALITY.md was measured: speculative sampling draws from
            # the same distribution but other samples (lockstep's draws are those of the measured runs
            # up to float rounding), so the recorded figures would not come back.
            "rollout": {"batch_size": 16, "speculative_tokens": 0}, "optim": {"lr": arm_lr(s, name), "warmup_steps": 5},
            "train": {"max_steps": s.arm_steps, "batch_size": s.batch_size, "seed": SEED, "keep_last": 1},
        }, s.arm_steps, train)
        if final is not None:
            students[name] = final

    # 5. Evaluation: per model (teacher included) Rouge-L and loss; per set one divergence pass.
    for set_name, path in sets.items():
        study.eval_model(set_name, path, "teacher", teacher)
        for name, model in students.items():
            study.eval_model(set_name, path, slug(name), model)
        study.eval_divergences(set_name, path, {slug(n): p for n, p in students.items()}, teacher)
    console.print(f"study stages took {time.time() - t_start:.0f}s in this invocation")

    # 6. Summary.
    summary = summarize(study, sets, students, teacher)
    stem = summary_stem(study.name, sets)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(render_markdown(summary), encoding="utf-8")
    console.print(render_markdown(summary), markup=False, highlight=False)
    console.print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return summary


def summary_stem(study: str, sets: dict[str, Path]) -> str:
    """"summary" for the study's default sets, else "summary-<set>+<set>": a dev-split evaluation
    (hyper-parameter choice) never overwrites the summary of the held-out sets."""
    return "summary" if list(sets) == list(DEFAULT_SETS[study]) else "summary-" + "+".join(sets)


def slug(name: str) -> str:
    """A row name as a file name ("warm-up start" -> "warm-up-start")."""
    return name.replace(" ", "-")


# ----------------------------------------------------------------------------------- summary
def per_prompt(samples: Path, score: Any) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:
    """Scores of one model's generations as (prompt indices, (S, N) array seeds × prompts, rows).

    `score(row) -> float` scores one generation; prompts are sorted by their data index."""
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    seeds = sorted({r["seed"] for r in rows})
    index = sorted({r["index"] for r in rows})
    col = {i: j for j, i in enumerate(index)}
    values = np.full((len(seeds), len(index)), np.nan)
    for r in rows:
        values[seeds.index(r["seed"]), col[r["index"]]] = score(r)
    if np.isnan(values).any():
        raise UserError(f"{samples}: not every prompt has a generation for every seed")
    return index, values, rows


def rouge_of(row: dict[str, Any]) -> float:
    return metrics_mod.rouge_l(row["response"], row["references"])


def rouge_precision_recall(row: dict[str, Any]) -> tuple[float, float]:
    """Rouge-L precision and recall (×100) against the reference of the best F-measure: a longer answer
    buys recall with precision, so these two show whether an F gain is only a length effect."""
    scores = [metrics_mod.rouge_l_scores(row["response"], ref) for ref in row["references"]]
    best = max(scores, key=lambda s: s[2])
    return best[0], best[1]


def length_buckets(ref_words: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Tertiles of the reference length in words: (bucket id per prompt, labels). Ties at a cut put
    every prompt of that length in the lower bucket, so buckets are equal-count only without ties."""
    lo, hi = (int(v) for v in np.quantile(ref_words, [1 / 3, 2 / 3], method="inverted_cdf"))
    hi = max(hi, lo + 1)
    ids = np.where(ref_words <= lo, 0, np.where(ref_words <= hi, 1, 2))
    middle = f"{hi} words" if hi == lo + 1 else f"{lo + 1}-{hi} words"
    return ids, [f"<= {lo} words", middle, f"> {hi} words"]


def interval(values: np.ndarray, base: np.ndarray) -> dict[str, float | bool]:
    d = metrics_mod.paired_bootstrap(values, base)
    return {"diff": d.diff, "low": d.low, "high": d.high, "prompts": d.prompts, "within_noise": d.within_noise}


def diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """What the training log says about a MiniLLM / GKD arm: first vs last buffer and step means."""
    recs = read_metrics(run_dir)
    if not recs:
        return None
    buffers = [r for r in recs if r.get("new_buffer") == 1]

    def first_last(key: str, rows: list[dict[str, Any]]) -> list[float] | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return [round(vals[0], 4), round(vals[-1], 4)] if vals else None

    def mean(key: str) -> float | None:
        vals = [r[key] for r in recs if r.get(key) is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    out: dict[str, Any] = {"steps": len(recs), "buffers": len(buffers), "grad_norm_mean": mean("grad_norm"),
                           "loss": first_last("loss", recs)}
    if buffers:
        out.update({k: first_last(k, buffers) for k in ("reward", "rkl", "rkl_ess", "resp_len")})
        out.update({f"{k}_mean": mean(k) for k in ("clip_frac", "pg_loss", "reg_loss", "resp_kd_loss")})
    return out


def summarize(study: Study, sets: dict[str, Path], students: dict[str, Path], teacher: Path) -> dict[str, Any]:
    """Collect the reports into one dict: per set and model the table's numbers, intervals, checks."""
    names = list(students)
    label_of = {str(p): n for n, p in students.items()}  # run_eval names a row by its path
    tokenizer = models_mod.load_tokenizer(teacher)
    out_sets: dict[str, Any] = {}
    for set_name, path in sets.items():
        d = study.out / "eval" / set_name
        scores: dict[str, np.ndarray] = {}
        index: list[int] = []
        model_rows: dict[str, Any] = {}
        ref_words: np.ndarray | None = None
        div = json.loads((d / "divergences.json").read_text(encoding="utf-8"))
        div_by_path = {m["name"]: m["metrics"] for m in div["models"]}
        for name in ["teacher", *names]:
            rep = json.loads((d / f"{slug(name)}.json").read_text(encoding="utf-8"))
            m = rep["models"][0]
            idx, values, rows = per_prompt(d / f"{slug(name)}.samples.jsonl", rouge_of)
            if index and idx != index:
                raise UserError(f"{d}: {name} was evaluated on other prompts than the teacher")
            index = idx
            scores[name] = values
            if ref_words is None:
                first = {r["index"]: r["references"][0] for r in rows}
                ref_words = np.array([len(first[i].split()) for i in index])
            by_seed: dict[int, list[str]] = {}
            for r in rows:
                by_seed.setdefault(r["seed"], []).append(r["response"])
            lengths = [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
            precision, recall = np.array([rouge_precision_recall(r) for r in rows]).mean(0)
            dv = div_by_path.get(str(students[name]), {}) if name != "teacher" else {}
            exacc = next((k for k in dv if k.startswith("exaccerr@")), None)
            model_rows[name] = {
                "rougeL": float(values.mean()), "rougeL_seed_std": float(values.mean(1).std(ddof=1)) if len(values) > 1 else None,
                "rougeL_precision": float(precision), "rougeL_recall": float(recall),
                "loss": (m["metrics"].get("loss") or {}).get("mean"),
                "rkl": (dv.get("rkl_student") or {}).get("mean"),
                "exaccerr": (dv.get(exacc) or {}).get("mean") if exacc else None, "exaccerr_at": exacc,
                "mean_length": statistics.fmean(lengths),
                "dist4": statistics.fmean(metrics_mod.distinct_n(t, 4) for t in by_seed.values()),
            }
        assert ref_words is not None
        for name in names:
            for base in (CONTROL, KD):
                if base in scores and name != base:
                    model_rows[name][f"vs_{base}"] = interval(scores[name], scores[base])
            if name.startswith("minillm-") and "minillm" in scores:  # a variant against the shipped default
                model_rows[name]["vs_minillm"] = interval(scores[name], scores["minillm"])
        bucket_ids, labels = length_buckets(ref_words)
        buckets: dict[str, Any] = {"labels": labels, "prompts": [int((bucket_ids == b).sum()) for b in range(3)],
                                   "rougeL": {}, "vs_control": {}}
        present = [b for b in range(3) if (bucket_ids == b).any()]  # a tiny set may leave a tertile empty
        for name in ["teacher", *names]:
            buckets["rougeL"][name] = [float(scores[name][:, bucket_ids == b].mean()) if b in present else None
                                       for b in range(3)]
            if CONTROL in scores and name not in ("teacher", CONTROL):
                buckets["vs_control"][name] = [
                    interval(scores[name][:, bucket_ids == b], scores[CONTROL][:, bucket_ids == b]) if b in present else None
                    for b in range(3)]
        stop = stopping.stopping_rows(div, {str(p): slug(n) for n, p in students.items()})
        report = report_json.from_json(div)
        for row in report.rows:
            row.name = label_of.get(row.name, row.name)
        report_mod.plot_exposure_bias(report, study.out / f"exposure-bias-{set_name}.png", data_name=set_name)
        seeds = sorted({int(s) for s in json.loads((d / "teacher.json").read_text(encoding="utf-8"))["settings"]["seeds"]})
        out_sets[set_name] = {"path": str(path), "prompts": len(index), "seeds": seeds,
                              "div_prompts": div["settings"]["data"]["examples"], "div_seed": div["settings"]["seeds"][0],
                              "div_new_tokens": div["settings"]["decoding"]["max_new_tokens"],
                              "rows": model_rows, "buckets": buckets, "stopping": stop}
    return {
        "study": study.name, "size": study.size, "is_result": study.size == "full",
        "setup": json.loads(json.dumps(asdict(study.setup))),
        "arms": {n: {**ARMS[n], "lr": arm_lr(study.setup, n)} for n in names if n in ARMS},
        "sets": out_sets,
        "targets": check_targets(out_sets),
        "diagnostics": {n: diagnostics(study.out / n) for n in names if n in ARMS and ARMS[n]["name"] in ("minillm", "gkd")},
        "timings": study.timings,
    }


def check_targets(sets: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20's targets per set and MiniLLM arm: Rouge-L >= KD + 1 and >= sft-continued with the
    interval of the difference above 0; ExAccErr below KD's."""
    checks = []
    for set_name, block in sets.items():
        rows = block["rows"]
        for arm in [n for n in rows if n.startswith("minillm")]:
            r = rows[arm]
            if f"vs_{KD}" in r:
                d = r[f"vs_{KD}"]
                checks.append({"set": set_name, "arm": arm, "target": "rougeL >= kd + 1, interval above 0",
                               "value": d["diff"], "low": d["low"], "high": d["high"],
                               "met": d["diff"] >= 1.0 and d["low"] > 0})
            if f"vs_{CONTROL}" in r:
                d = r[f"vs_{CONTROL}"]
                checks.append({"set": set_name, "arm": arm, "target": "rougeL >= sft-continued, interval above 0",
                               "value": d["diff"], "low": d["low"], "high": d["high"], "met": d["low"] > 0})
            if KD in rows and r["exaccerr"] is not None and rows[KD]["exaccerr"] is not None:
                checks.append({"set": set_name, "arm": arm, "target": f"{r['exaccerr_at']} below kd's",
                               "value": r["exaccerr"] - rows[KD]["exaccerr"], "low": None, "high": None,
                               "met": r["exaccerr"] < rows[KD]["exaccerr"]})
    return checks


def _f(v: float | None, decimals: int = 2) -> str:
    return "-" if v is None else f"{v:.{decimals}f}"


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    text = f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
    return text + (" within noise" if d["within_noise"] else "")


def _first_last(dg: dict[str, Any]) -> Any:
    """A formatter of the diagnostics' [first, last] pairs as "a → b"."""
    return lambda k: "-" if not dg.get(k) else f"{dg[k][0]:.3f} → {dg[k][1]:.3f}"


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: per set the main table and the length buckets; targets, diagnostics, timings."""
    smoke_run = not summary["is_result"]
    lines = [f"# Quality study `{summary['study']}`: {summary['size']} size"
             + (" (SMOKE RUN: pipeline check, NOT results)" if smoke_run else ""), "",
             "Arms (method, learning rate): " + ", ".join(
                 f"{n} ({a['name']}, {a['lr']:g})" for n, a in summary["arms"].items() if "lr" in a) + ".", ""]
    for set_name, block in summary["sets"].items():
        at = next((r["exaccerr_at"] for r in block["rows"].values() if r["exaccerr_at"]), "exaccerr")
        lines += [f"## {set_name}: `{block['path']}`", "",
                  f"Rouge-L, LM loss, mean length (teacher tokens), Dist-4: {block['prompts']} prompts × seeds "
                  f"{block['seeds']}; differences with 95% paired bootstrap intervals over prompts (2000 resamples, "
                  f"seeds kept together). Reverse KL KL(q‖p) (nats/token, student samples) and {at}: first "
                  f"{block['div_prompts']} prompts, seed {block['div_seed']}.", "",
                  f"| model | Rouge-L | − {CONTROL} [95% CI] | − {KD} [95% CI] | Rouge-L P / R | LM loss | reverse KL "
                  f"| {at} (%) | length | Dist-4 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in block["rows"].items():
            rouge = _f(r["rougeL"]) + (f" ± {r['rougeL_seed_std']:.2f}" if r["rougeL_seed_std"] is not None else "")
            pr = f"{_f(r.get('rougeL_precision'), 1)} / {_f(r.get('rougeL_recall'), 1)}"
            lines.append(f"| {name} | {rouge} | {_ci(r.get(f'vs_{CONTROL}'))} | {_ci(r.get(f'vs_{KD}'))} | {pr} | "
                         f"{_f(r['loss'], 3)} | {_f(r['rkl'], 3)} | {_f(r['exaccerr'], 1)} | {_f(r['mean_length'], 1)} "
                         f"| {_f(r['dist4'], 1)} |")
        variants = {n: r["vs_minillm"] for n, r in block["rows"].items() if "vs_minillm" in r}
        if variants:
            lines += ["", "MiniLLM variants minus the default `minillm` (Rouge-L, paired 95% interval): "
                      + "; ".join(f"{n} {_ci(d)}" for n, d in variants.items()) + "."]
        lines += ["", *stopping.render_stopping(block)]
        rq5 = stopping.render_rq5(block, {slug(n): r for n, r in block["rows"].items()})
        if rq5:
            lines += ["RQ5 and the length fixes, each minus the default `minillm` (paired 95% intervals; Rouge-L over "
                      f"all {block['prompts']} prompts and seeds, the rest over the {block['div_prompts']} divergence "
                      "rows):", "", *rq5]
        b = block["buckets"]
        lines += ["", f"Rouge-L by reference length (tertiles; prompts per bucket {b['prompts']}), and the difference "
                  f"to {CONTROL} with its 95% interval:", "",
                  "| model | " + " | ".join(b["labels"]) + " |", "|---|" + "---:|" * len(b["labels"])]
        for name, vals in b["rougeL"].items():
            diffs = b["vs_control"].get(name)
            cells = [_f(v) + (f" ({_ci(diffs[i])})" if diffs and diffs[i] else "") for i, v in enumerate(vals)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets (issue 20)", "", "| set | arm | target | difference [95% CI] | met |", "|---|---|---|---:|---|"]
    for c in summary["targets"]:
        span = f"{c['value']:+.2f}" + (f" [{c['low']:+.2f}, {c['high']:+.2f}]" if c["low"] is not None else "")
        lines.append(f"| {c['set']} | {c['arm']} | {c['target']} | {span} | {'yes' if c['met'] else 'no'}"
                     f"{' (smoke)' if smoke_run else ''} |")
    lines += ["", "## Training diagnostics (first → last buffer; means over steps)", "",
              "| arm | loss | reward | rkl (IS) | resp. length | clip frac | pg loss | reg loss | resp-kd loss | grad norm |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for name, dg in summary["diagnostics"].items():
        if not dg:
            continue
        fl = _first_last(dg)
        lines.append(f"| {name} | {fl('loss')} | {fl('reward')} | {fl('rkl')} | {fl('resp_len')} | "
                     f"{_f(dg.get('clip_frac_mean'), 3)} | {_f(dg.get('pg_loss_mean'), 3)} | {_f(dg.get('reg_loss_mean'), 3)} | "
                     f"{_f(dg.get('resp_kd_loss_mean'), 3)} | {_f(dg.get('grad_norm_mean'), 3)} |")
    lines += ["", "## Timings (this machine)", "", "| stage | wall s | steps | mean s/step |", "|---|---:|---:|---:|"]
    for name, t in summary["timings"].items():
        times = t.get("step_times") or []
        lines.append(f"| {name} | {t['wall_s']:.1f} | {t.get('steps', '-')} | "
                     f"{statistics.fmean(times) if times else float('nan'):.2f} |".replace("nan", "-"))
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- main
def parse_sets(values: list[str] | None, study: str) -> dict[str, Path]:
    """`--eval-set NAME=FILE` (any number) -> {name: path}; none given: the study's default sets."""
    if not values:
        return dict(DEFAULT_SETS[study])
    sets: dict[str, Path] = {}
    for v in values:
        name, sep, file = v.partition("=")
        if not sep or not name or not file or "/" in name:
            raise UserError(f"--eval-set {v!r}: expected NAME=FILE (a name without '/')")
        if name in sets:
            raise UserError(f"--eval-set {name}: given twice")
        sets[name] = Path(file).expanduser()
    return sets


def parse_arms(value: str | None) -> list[str]:
    """`--arms a,b,...` (default DEFAULT_ARMS, those the installed minillm supports; `drift`: DRIFT_ARMS)."""
    if value is None:
        return [a for a in DEFAULT_ARMS if arm_available(a)]
    arms = [a.strip() for a in value.split(",") if a.strip()]
    if arms == ["drift"]:
        arms = list(DRIFT_ARMS)
    for a in arms:
        if a not in ARMS:
            raise UserError(f"--arms: unknown arm {a!r}; known: {', '.join(ARMS)}")
        if not arm_available(a):
            raise UserError(f"--arms: {a} needs method keys this minillm does not have")
    for needed in (CONTROL, KD):
        if needed not in arms:
            arms.insert(0, needed)  # every arm is compared with these two
    return list(dict.fromkeys(arms))


def main(argv: list[str] | None = None) -> int:
    """Command line: parse the arguments, run the study, print the summary. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="shared")
    parser.add_argument("--out", type=Path, default=None, help="study directory (default bench/out/quality-STUDY)")
    parser.add_argument("--size", choices=("full", "smoke"), default="full")
    parser.add_argument("--train", default=None, help="training file (default: the study's)")
    parser.add_argument("--eval-set", action="append", metavar="NAME=FILE",
                        help="an evaluation set (any number; default: the study's sets)")
    parser.add_argument("--arms", default=None, help=f"comma-separated arms (default {','.join(DEFAULT_ARMS)}; "
                        f"all: {','.join(ARMS)})")
    parser.add_argument("--eval-only", action="store_true",
                        help="train nothing: evaluate the students that exist (e.g. on a new --eval-set)")
    args = parser.parse_args(argv)
    console = Console()
    resume_hint = f"run the same command again to resume: python {' '.join(sys.argv)}"
    try:
        setup = STUDIES[args.study]
        if args.train:
            setup = replace(setup, train=str(Path(args.train).expanduser()))
        if args.size == "smoke":
            setup = smoke(setup)
        out = args.out or REPO / "bench" / "out" / f"quality-{args.study}{'-smoke' if args.size == 'smoke' else ''}"
        study = Study(out, args.study, setup, args.size, console)
        run_study(study, parse_arms(args.arms), parse_sets(args.eval_set, args.study), train=not args.eval_only)
    except UserError as e:
        console.print(f"error: {e}", highlight=False, markup=False)
        return 2
    except RunStopped as e:  # a training stage saved its last step on SIGINT / SIGTERM
        console.print(f"{e}\n{resume_hint}", highlight=False, markup=False)
        return e.exit_code
    except KeyboardInterrupt:  # during an evaluation: its partial report is discarded on resume
        console.print(f"interrupted\n{resume_hint}", highlight=False, markup=False)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
