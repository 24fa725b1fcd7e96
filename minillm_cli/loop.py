"""The one training loop shared by every method (sft, kd, seqkd, gkd, minillm).

`train(recipe, source)` reads top to bottom: resolve models -> load data -> load models -> make the
run dir -> build optimizer and the method's stepper -> (resume) -> loop: lr, step, clip, check,
update, log, dev loss / dev eval, save -> final save. A method is a "stepper" object (see
`methods/`) with `step() -> metrics` (forward + backward of one optimizer step), `state()` and
`load_state()` for exact resume; the loop owns the optimizer, schedule, RNG, signals and saving.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from minillm_cli import __version__
from minillm_cli import checkpoint as ckpt
from minillm_cli import data as data_mod
from minillm_cli import models as models_mod
from minillm_cli import rundir
from minillm_cli.config import Recipe, dump_resolved, read_recipe_file, validate
from minillm_cli.errors import RunStopped, UserError
from minillm_cli.progress import Progress

TEACHER_METHODS = ("kd", "seqkd", "gkd", "minillm")


@dataclass
class Ctx:
    """Everything a method's stepper needs; built once by `train`."""

    recipe: Recipe
    accelerator: Any
    student: torch.nn.Module
    """The trained model as prepared by accelerate (DDP-wrapped when distributed)."""
    teacher: torch.nn.Module | None
    tokenizer: Any
    train: list[data_mod.Encoded]
    dev: list[data_mod.Encoded]
    corpus: list[list[int]] | None
    run_dir: Path
    device: torch.device
    gen: torch.Generator
    """Sampling RNG (rollouts, GKD's coin): saved and restored for exact resume."""
    vocab: int
    """Student output width; teacher logits are sliced to it."""
    stop_requested: Callable[[], bool]
    print: Callable[[str], None]
    data_pos: int = 0
    """Examples consumed from the seeded training stream (all ranks together)."""
    extra_meta: dict[str, Any] = field(default_factory=dict)
    sharded: bool = False
    """The student's weights are sharded over the processes (FSDP, DeepSpeed ZeRO-3)."""
    deepspeed: bool = False
    """DeepSpeed owns the optimizer step (taken inside the backward of a step's last micro-batch)."""
    weights_version: int = 0
    """Optimizer steps applied in this process (tells `sampling_model` when its copy is stale)."""
    _replica: torch.nn.Module | None = None
    _replica_version: int = -1

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def next_examples(self, count_per_rank: int) -> list[data_mod.Encoded]:
        """This rank's share of the next global batch from the seeded data stream."""
        total = count_per_rank * self.world
        idx = data_mod.take_indices(len(self.train), self.recipe.train.seed, self.data_pos, total)
        self.data_pos += total
        return [self.train[i] for i in idx[self.rank :: self.world]]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward one micro-batch; gradient sync across ranks only on the last one of the step."""
        if self.deepspeed:
            # The engine steps its optimizer in a backward that ends gradient accumulation: only the
            # step's last micro-batch may (our loss scaling already averages over micro-batches).
            state = self.accelerator.gradient_state
            state._set_sync_gradients(last)
            try:
                self.accelerator.backward(loss)
            finally:
                state._set_sync_gradients(True)
        elif last or self.world == 1:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(self.student):
                self.accelerator.backward(loss)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks (token counts, whitening statistics)."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), reduction="sum")

    def sampling_model(self) -> torch.nn.Module:
        """The student for sampling and no-grad evaluation, usable by this process alone.

        Unsharded runs: the trained model itself. Sharded runs: a full local copy, refreshed from the
        shards when an optimizer step changed them, so that decode loops of different lengths on
        different ranks need no collective. Every rank must call it at the same point of the run
        (a refresh gathers the shards).
        """
        model = self.accelerator.unwrap_model(self.student)
        if not self.sharded:
            return model
        if self._replica is None:
            from transformers import AutoModelForCausalLM

            dtype = models_mod.pick_dtype(self.recipe.models.dtype, self.device)
            with torch.device(self.device):  # initialise on the device: the weights are overwritten below
                self._replica = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
            self._replica.requires_grad_(False)
            self._replica.eval()
        if self._replica_version != self.weights_version:
            _gather_full_weights(self.student, self._replica, self.deepspeed)
            self._replica_version = self.weights_version
        return self._replica


class _Signals:
    """First SIGINT/SIGTERM: ask the loop to stop after saving; second: exit at once."""

    def __init__(self, repeat_grace: float = 0.0) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        # Under a launcher (torchrun) a Ctrl-C reaches each process twice, from the terminal and
        # forwarded by the launcher: a repeat within `repeat_grace` seconds is the same request.
        self.repeat_grace = repeat_grace
        self._first_at = 0.0

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handlers
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and time.monotonic() - self._first_at < self.repeat_grace:
            return
        if self.received is not None:
            # Checkpoints are written to a temporary name and renamed: exiting now corrupts nothing.
            os._exit(128 + signum)
        self.received = signum
        self._first_at = time.monotonic()

    def requested(self) -> bool:
        return self.received is not None


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    o, total = recipe.optim, recipe.train.max_steps
    warm = min(o.warmup_steps, max(total - 1, 0))
    if step < warm:
        return o.lr * (step + 1) / (warm + 1)
    if o.schedule == "constant":
        return o.lr
    progress = (step - warm) / max(1, total - warm)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.sampling": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(gen: torch.Generator, tensors: dict[str, torch.Tensor]) -> None:
    gen.set_state(tensors["rng.sampling"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def make_stepper(ctx: Ctx) -> Any:
    """The method's stepper object (one module per method, each readable alone)."""
    name = ctx.recipe.method.name
    if name == "sft":
        from minillm_cli.methods.sft import SftStepper as cls
    elif name == "kd":
        from minillm_cli.methods.kd import KdStepper as cls
    elif name == "seqkd":
        from minillm_cli.methods.seqkd import SeqKdStepper as cls
    elif name == "gkd":
        from minillm_cli.methods.gkd import GkdStepper as cls
    else:
        from minillm_cli.methods.minillm import MiniLlmStepper as cls
    return cls(ctx)


def _resolve(key: str, name: str) -> Path:
    """`models_mod.resolve_model`, its errors prefixed with the recipe key they are about."""
    try:
        return models_mod.resolve_model(name)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def resolve_models(recipe: Recipe, say: Callable[[str], None]) -> tuple[Path | None, Path, dict[str, Any]]:
    """Resolve teacher and student to local model directories (building the student if asked).

    Returns (teacher_dir or None, student_dir, student_init record for the run's meta).
    """
    m = recipe.models
    needs_teacher = recipe.method.name in TEACHER_METHODS
    if needs_teacher and m.teacher is None:
        raise UserError(f"models.teacher: method {recipe.method.name} needs a teacher (set it or pass --teacher)")
    teacher_dir = _resolve("models.teacher", m.teacher) if m.teacher is not None else None
    if m.student is not None:
        return teacher_dir, _resolve("models.student", m.student), {"from": "model", "path": m.student}
    if m.student_init is None:
        raise UserError("models.student: no student given (set models.student, models.student_init or --student)")
    if teacher_dir is None:
        raise UserError("models.student_init: building a student from the teacher needs models.teacher")
    init = m.student_init
    record = init.model_dump(by_alias=True)
    spec = json.dumps({"teacher": str(teacher_dir.resolve()), **record}, sort_keys=True, default=str)
    key = f"{teacher_dir.name}-{init.from_}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    out = models_mod.cache_dir() / "students" / key
    if not (out / "config.json").exists():
        say(f"building student ({init.from_}) from {teacher_dir} -> {out}")
        if init.from_ == "teacher":
            models_mod.init_student_from_teacher(teacher_dir, out, layers=init.layers, keep=init.keep)
        else:
            models_mod.init_student_fresh(teacher_dir, out, overrides=init.config)
    record["path"] = str(out)
    return teacher_dir, out, record


def _inputs(recipe: Recipe) -> dict[str, Path]:
    """The run's local inputs (recipe key -> path), which an --overwrite must never delete."""
    keys = {"data.train": recipe.data.train, "data.dev": recipe.data.dev, "data.corpus": recipe.data.corpus,
            "models.teacher": recipe.models.teacher, "models.student": recipe.models.student}
    out = {}
    for key, value in keys.items():
        try:
            if value and Path(value).expanduser().exists():
                out[key] = Path(value).expanduser()
        except (OSError, ValueError):
            continue
    return out


def _check_resume(recipe: Recipe, resume_dir: Path, hashes: dict[str, str | None],
                  extend: bool) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Compare the recipe asked for now with the checkpoint's (see `rundir.check_resume`).

    Returns the new extension record (or None) and the run's earlier ones, from the step's meta.json.
    """
    try:
        saved = validate(read_recipe_file(resume_dir / "recipe.yaml"))
        meta = json.loads((resume_dir / "meta.json").read_text(encoding="utf-8"))
    except UserError as e:
        raise UserError(f"--resume: the saved recipe of {resume_dir} is unusable ({e})") from None
    extension = rundir.check_resume(saved, recipe, meta, hashes, extend=extend)
    return extension, list(meta.get("extended", []))


def train(recipe: Recipe, source: dict[str, str], *, resume: bool = False, extend: bool = False,
          console: Console | None = None) -> Path:
    """Run one training job (any method) described by `recipe`; returns the run directory.

    Args:
        resume: continue the run in `output.dir` from its newest intact checkpoint; the recipe must
            be the run's own (`rundir.check_resume`).
        extend: with `resume`, allow a larger `train.max_steps` when the schedule does not depend on it.
    """
    claims: list[rundir.Claim] = []
    try:
        return _train(recipe, source, resume, extend, console, claims)
    except BaseException:
        for claim in claims:
            claim.abandon()  # a setup that failed (or was interrupted) leaves nothing it created
        raise
    finally:
        for claim in claims:
            claim.release()  # the run directory's lock: free for the next process


def _train(recipe: Recipe, source: dict[str, str], resume: bool, extend: bool, console: Console | None,
           claims: list[rundir.Claim]) -> Path:
    from accelerate import Accelerator

    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress view is the only one
    console = console or Console()
    t_setup = time.time()
    tr, m = recipe.train, recipe.models
    if tr.threads:
        torch.set_num_threads(tr.threads)

    device = models_mod.pick_device(m.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    device = accelerator.device
    main = accelerator.is_main_process
    # Messages hold paths and user text: printed as they are, never read as rich markup.
    say = (lambda s: console.print(s, highlight=False, markup=False)) if main else (lambda s: None)

    # Every rank checks every input; all of them stop, with one message, if any rank failed,
    # before the main process writes anything.
    run_dir = Path(recipe.output.dir) if recipe.output.dir else default_run_dir(recipe.method.name)
    if accelerator.num_processes > 1 and not recipe.output.dir:  # rank 0's timestamp names the run
        from accelerate.utils import broadcast_object_list

        run_dir = broadcast_object_list([run_dir])[0]
    setup_error: Exception | None = None
    claim: rundir.Claim | None = None
    extension: dict[str, Any] | None = None
    extended: list[dict[str, Any]] = []
    try:
        _check_launch(recipe, accelerator, resume)
        # ---- run directory: owned by the main process from here on (a lock; nothing deleted yet)
        hashes = rundir.data_hashes(recipe.data)  # once: compared on resume, recorded in meta.json
        if main:
            claim = rundir.claim(run_dir, resume=resume, overwrite=recipe.output.overwrite, protected=_inputs(recipe))
            claims.append(claim)
        resume_dir: Path | None = None
        if resume:
            resume_dir, skipped = rundir.resumable_step(run_dir)
            for note in skipped:
                say(f"--resume: skipping damaged checkpoint {note}")
            ckpt.check_world_size(resume_dir, accelerator.num_processes)
            extension, extended = _check_resume(recipe, resume_dir, hashes, extend)

        # ---- models and data
        teacher_dir, student_dir, student_init = resolve_models(recipe, say)
        tokenizer = models_mod.load_tokenizer(student_dir, trust_remote_code=m.trust_remote_code)
        tokenizer.padding_side = "left"
        if teacher_dir is not None:
            t_tok = models_mod.load_tokenizer(teacher_dir, trust_remote_code=m.trust_remote_code)
            models_mod.check_tokenizers(
                t_tok, tokenizer,
                teacher_vocab=models_mod.output_width(teacher_dir), student_vocab=models_mod.output_width(student_dir),
            )
        train_enc, dev_enc, _, _ = data_mod.prepare_datasets(recipe.data, tokenizer, tr.seed, say)
        corpus = None
        if recipe.data.corpus and recipe.method.name == "minillm":
            corpus = data_mod.load_corpus(recipe.data.corpus, tokenizer, recipe.data.corpus_max_tokens)

        dtype = models_mod.pick_dtype(m.dtype, device)
        load_kw = dict(dtype=dtype, device=device, trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
        student = models_mod.load_model(student_dir, **load_kw)
        if m.lora.enabled:
            student = _apply_lora(student, recipe, resume_dir)
        elif resume_dir is not None:
            _load_weights(student, resume_dir)
        if m.trainable_layers is not None:
            _freeze_below(student, m.trainable_layers)
        student.train()
        _disable_dropout(student)  # distillation and our SFT run without dropout (reference setting)
        teacher = None
        if teacher_dir is not None:
            teacher_device = _teacher_device(m.teacher_placement, device)
            teacher = models_mod.load_model(teacher_dir, **{**load_kw, "device": teacher_device})
            teacher.requires_grad_(False)
            if m.teacher_placement == "cpu" or m.teacher_placement.startswith("device:"):
                _outputs_to_caller(teacher, teacher_device)
        vocab = student.get_output_embeddings().weight.shape[0]

        resume_state = None
        if resume_dir is not None:
            resume_state = ckpt.load_resume_state(resume_dir, accelerator.process_index, accelerator.num_processes)
    except Exception as e:  # re-raised by _agree_on_setup, on every rank
        setup_error = e
    _agree_on_setup(accelerator, setup_error)

    # ---- run dir + resolved recipe (a resumed run keeps its recipe unless --extend changed it)
    recipe_text = dump_resolved(recipe, source)
    if main:
        assert claim is not None
        try:
            claim.prepare()
            if resume_dir is None or extension is not None:
                ckpt.write_text_atomic(run_dir / "recipe.yaml", recipe_text)
            if resume_dir is not None:
                dropped = rundir.trim_metrics(run_dir, int(resume_state[0]["step"]))
                if dropped:
                    say(f"metrics.jsonl: dropped {dropped} records of steps after the checkpoint (not saved before the stop)")
        except OSError as e:
            what = "disk full" if ckpt.is_disk_full(e) else (e.strerror or str(e))
            raise UserError(f"output.dir: cannot write the run directory {run_dir}: {what}") from None
    if extension is not None:
        extended = [*extended, {**extension, "at_step": int(resume_state[0]["step"])}]
        say(f"--extend: train.max_steps {extension['from']} → {extension['to']} (recorded in meta.json)")
    accelerator.wait_for_everyone()

    params = [p for p in student.parameters() if p.requires_grad]
    o = recipe.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    deepspeed, sharded = _is_deepspeed(accelerator), _is_sharded(accelerator)
    if deepspeed:  # DeepSpeed sizes its engine from the micro-batch; accumulation is ours (Ctx.backward)
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tr.batch_size
    student_wrapped, optimizer = accelerator.prepare(student, optimizer)
    if teacher is not None and m.teacher_placement == "sharded":
        # Not evaluation_mode: accelerate only shards (wraps in FSDP) a model prepared for training;
        # the teacher has no trainable parameter and gets no optimizer, so it stays frozen.
        teacher = accelerator.prepare_model(teacher)
        teacher.eval()
    clip_params = list(student_wrapped.parameters()) if sharded else params  # FSDP finds its model by them

    gen = torch.Generator(device=device)
    gen.manual_seed(tr.seed + accelerator.process_index)  # each rank draws its own samples
    torch.manual_seed(tr.seed)
    world = accelerator.num_processes
    signals = _Signals(repeat_grace=2.0 if world > 1 else 0.0)
    ctx = Ctx(
        recipe=recipe, accelerator=accelerator, student=student_wrapped, teacher=teacher, tokenizer=tokenizer,
        train=train_enc, dev=dev_enc, corpus=corpus, run_dir=run_dir, device=device, gen=gen, vocab=vocab,
        # Several processes stop together, at a step boundary (see the loop); one may stop mid-step.
        stop_requested=signals.requested if world == 1 else (lambda: False), print=say,
        sharded=sharded, deepspeed=deepspeed,
    )
    stepper = make_stepper(ctx)

    start_step, bad_total = 0, 0
    if resume_dir is not None:
        assert resume_state is not None
        state, tensors = resume_state
        start_step, ctx.data_pos, bad_total = state["step"], state["data_pos"], state.get("bad_steps", 0)
        optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, state["optimizer"]))
        _restore_rng(gen, tensors)
        stepper.load_state(state.get("method", {}), tensors)
        say(f"resumed from {resume_dir} (step {start_step})")

    meta_base = {
        "method": recipe.method.name, "method_settings": recipe.method.model_dump(),
        "teacher": m.teacher, "teacher_dir": str(teacher_dir) if teacher_dir else None,
        "student": m.student, "student_init": student_init,
        "data": {"path": recipe.data.train, "sha256": hashes["train"], "dev_sha256": hashes["dev"],
                 "corpus_sha256": hashes["corpus"]},
        "extended": extended,
        "lora": m.lora.enabled, "base_model": str(student_dir) if m.lora.enabled else None,
        "minillm_version": __version__,
    }
    say(f"run dir: {run_dir}  (setup {time.time() - t_setup:.1f}s, {len(train_enc)} train / {len(dev_enc)} dev examples, "
        f"device {device}, dtype {str(dtype).replace('torch.', '')})")

    # Data parallel: the optimizer state is the same on every rank, rank 0 saves it. FSDP: each rank
    # saves its own shard. DeepSpeed keeps the state in its own format (such runs cannot resume).
    saves_optimizer = not deepspeed and (main or sharded)

    def snapshot(step: int, bad: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(optimizer.state_dict()) if saves_optimizer else ({}, None)
        method_json, method_tensors = stepper.state()
        state = {"step": step, "data_pos": ctx.data_pos, "bad_steps": bad, "world_size": world, "optimizer": opt_meta,
                 "method": method_json}
        return state, {**opt_tensors, **_rng_tensors(gen), **method_tensors}

    def save(step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor], dev_metrics: dict[str, float]) -> Path | None:
        path = None
        if _any_rank(accelerator, not _weights_finite(student_wrapped)):
            prev = ckpt.latest_step_dir(run_dir)
            kept = f"the last checkpoint {prev.name} is intact" if prev else "no checkpoint was saved"
            raise RunStopped(f"stopped at step {step}: the student's weights are no longer finite (NaN or inf), "
                             f"so they were not saved; {kept}; lower optim.lr (now {recipe.optim.lr:g})", exit_code=1)
        full_weights = accelerator.get_state_dict(student_wrapped) if sharded else None  # collective gather
        if not main:  # each rank's RNG / rollout buffer; the main process moves it into the step dir
            ckpt.stage_rank_state(run_dir, step, accelerator.process_index, tensors, state["method"])
        accelerator.wait_for_everyone()
        if main:
            meta = {**meta_base, **ctx.extra_meta, "step": step, "dev_metrics": dev_metrics}
            path = ckpt.save_checkpoint(
                run_dir, step, model=accelerator.unwrap_model(student_wrapped), tokenizer=tokenizer,
                recipe_text=recipe_text, meta=meta, trainer_state=state, state_tensors=tensors, keep_last=tr.keep_last,
                world_size=world, model_state_dict=full_weights,
            )
        accelerator.wait_for_everyone()
        return path

    dev_metrics: dict[str, float] = {}
    consecutive_bad = 0
    step = start_step
    last_saved = start_step if resume_dir is not None else -1
    with signals, Progress(run_dir, tr.max_steps, f"minillm {recipe.method.name}", console, start_step, main) as progress:
        while step < tr.max_steps:
            # State at the start of the step: what we save if a signal interrupts this step.
            safe_state = snapshot(step, bad_total)
            lr = lr_at(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            try:
                metrics = stepper.step()
            except _Interrupted:
                optimizer.zero_grad(set_to_none=True)
                _finish_interrupted(signals, step, last_saved, safe_state, save, dev_metrics, say)
            grad_norm = _clip(accelerator, clip_params, o.grad_clip, sharded or deepspeed)
            loss_value = float(metrics.get("loss", 0.0))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad += 1
                bad_total += 1
                say(f"step {step + 1}: non-finite loss or gradient (loss={loss_value}, grad_norm={grad_norm}); step skipped")
                if consecutive_bad >= tr.max_bad_steps:
                    raise RunStopped(
                        f"stopped: {consecutive_bad} consecutive steps with a non-finite loss or gradient "
                        f"(last at step {step + 1}); lower optim.lr or check the data", exit_code=1)
                step += 1
                continue
            consecutive_bad = 0
            try:
                optimizer.step()
            except RuntimeError as e:
                if "overflow" not in str(e):
                    raise
                raise RunStopped(f"stopped at step {step + 1}: the optimizer's update overflows the weights' dtype "
                                 f"(optim.lr={o.lr:g} is far too large); nothing of this step was saved",
                                 exit_code=1) from None
            optimizer.zero_grad(set_to_none=True)
            ctx.weights_version += 1
            step += 1
            metrics.update(lr=lr, grad_norm=grad_norm, step_time=time.time() - t0, bad_steps=bad_total)
            if step % tr.log_every == 0 or step == tr.max_steps:
                progress.log(step, _reduce_metrics(accelerator, metrics))
            if tr.dev_loss_every and step % tr.dev_loss_every == 0 and ctx.dev:
                dev_metrics["dev/loss"] = dev_loss(ctx)
                progress.log(step, {"dev/loss": dev_metrics["dev/loss"]})
            if recipe.eval.every and step % recipe.eval.every == 0 and ctx.dev:
                dev_metrics.update(dev_eval(ctx))
                progress.log(step, {k: v for k, v in dev_metrics.items()})
            if _any_rank(accelerator, signals.requested()):
                state, tensors = snapshot(step, bad_total)
                _finish_interrupted(signals, step, last_saved, (state, tensors), save, dev_metrics, say, completed=True)
            if tr.save_every and step % tr.save_every == 0 and step < tr.max_steps:
                save(step, *snapshot(step, bad_total), dev_metrics)
                last_saved = step
        final = save(step, *snapshot(step, bad_total), dev_metrics) if last_saved != step else ckpt.latest_step_dir(run_dir)
    say(f"done: {tr.max_steps} steps; final checkpoint {final}")
    return run_dir


class _Interrupted(Exception):
    """Raised by steppers (between decode steps or micro-batches) when a stop was requested."""


def check_stop(ctx: Ctx) -> None:
    """Call inside long method work (rollouts): abandons the step if a signal arrived."""
    if ctx.stop_requested():
        raise _Interrupted()


def _finish_interrupted(signals: _Signals, step: int, last_saved: int, state_and_tensors: tuple, save: Callable,
                        dev_metrics: dict[str, float], say: Callable[[str], None], completed: bool = False) -> None:
    signum = signals.received or signal.SIGINT
    name = signal.Signals(signum).name
    path = None
    if step > 0 and step != last_saved:
        path = save(step, *state_and_tensors, dev_metrics)
    if path is None and last_saved < 0:
        # Nothing was ever saved: there is nothing to resume, and the next start may reuse the directory.
        raise RunStopped(f"{name} received: stopped before the first step completed; nothing was saved, so there "
                         "is nothing to resume: run the same command again to start over", 128 + signum)
    where = f"checkpoint {path}" if path else "no new checkpoint (nothing completed since the last one)"
    raise RunStopped(f"{name} received: stopped after step {step}; {where}; continue with --resume", 128 + signum)


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of this process is finite (one fused reduction per dtype group)."""
    params = [p.detach() for p in model.parameters() if p.numel()]
    if not params:
        return True
    return all(bool(torch.isfinite(n)) for n in torch._foreach_norm(params))


def _clip(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float | None, sharded: bool = False) -> float:
    if sharded:
        # Each rank holds a part of the gradient: only accelerate (FSDP, DeepSpeed) knows the global
        # norm; an infinite max_norm measures without clipping. DeepSpeed has already clipped.
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        return float(norm) if norm is not None else 0.0
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _reduce_metrics(accelerator: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean of numeric metrics over ranks (logged once, by the main process)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if accelerator.num_processes > 1 and out:
        keys = sorted(out)
        t = torch.tensor([out[k] for k in keys], device=accelerator.device, dtype=torch.float64)
        t = accelerator.reduce(t, reduction="mean")
        out = dict(zip(keys, t.tolist()))
    return out


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a signal, say, reaches ranks at different times)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _agree_on_setup(accelerator: Any, error: Exception | None) -> None:
    """Raise on every rank if setup failed on any rank (the failing rank re-raises its own error).

    Collective: every rank calls it once, after its checks and before the main process writes.
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])  # one per rank
        failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
        if failed and error is None:
            rank, msg = failed[0]
            text = msg.split(": ", 1)[1] if msg.startswith("UserError: ") else msg
            raise UserError(f"rank {rank}: {text}")
    if error is not None:
        raise error


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_sharded(accelerator: Any) -> bool:
    """Whether a prepared student holds only a shard of its weights in each process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return _is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def _check_launch(recipe: Recipe, accelerator: Any, resume: bool) -> None:
    """Refuse recipe / launch combinations the loop cannot run correctly (before any work)."""
    from accelerate.utils import DistributedType

    m, name = recipe.models, recipe.method.name
    world = accelerator.num_processes
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    launch = "FSDP" if fsdp else "DeepSpeed" if _is_deepspeed(accelerator) else None
    teacher_samples = name == "seqkd" or (name == "minillm" and getattr(recipe.method, "teacher_mix", 0) > 0)
    placement = m.teacher_placement
    if fsdp and getattr(accelerator, "is_fsdp2", False):
        raise UserError("accelerate config: fsdp_version 2 is not supported; use recipes/accelerate/fsdp.yaml (version 1)")
    if placement == "sharded":
        if not fsdp:
            raise UserError("models.teacher_placement: sharded needs an FSDP launch "
                            "(accelerate launch --config_file recipes/accelerate/fsdp.yaml ...)")
        if teacher_samples:
            raise UserError(f"models.teacher_placement: a sharded teacher cannot sample ({name} samples from the "
                            "teacher, and ranks decode for different lengths); use shared or cpu")
    if placement.startswith("device:"):
        if world > 1:
            raise UserError(f"models.teacher_placement: {placement} is for single-process runs ({world} processes here)")
        if accelerator.device.type == "cpu":
            raise UserError(f"models.teacher_placement: {placement} needs accelerators; this run is on the CPU")
        count = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
        if int(placement[7:]) >= count:
            raise UserError(f"models.teacher_placement: {placement} does not exist ({count} devices)")
    if launch is not None and _is_sharded(accelerator):
        if name == "gkd":
            raise UserError(f"method.name: gkd samples from the student at every micro-batch, not supported under {launch}")
        if m.lora.enabled:
            raise UserError(f"models.lora: LoRA is not supported under {launch}; use recipes/accelerate/ddp.yaml")
    if launch == "DeepSpeed":
        clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        if resume:
            raise UserError("--resume: DeepSpeed runs keep the optimizer in DeepSpeed's own format and cannot resume yet")
        if (recipe.optim.grad_clip or 0.0) != float(clip or 0.0):
            raise UserError(f"optim.grad_clip: {recipe.optim.grad_clip} differs from the DeepSpeed config's "
                            f"gradient_clipping {clip} (DeepSpeed clips inside its step); make them equal")


def _teacher_device(placement: str, student_device: torch.device) -> torch.device:
    """Where `models.teacher_placement` loads the teacher (a sharded one first loads on the student's)."""
    if placement == "cpu":
        return torch.device("cpu")
    if placement.startswith("device:"):
        return torch.device(student_device.type, int(placement[7:]))
    return student_device


def _outputs_to_caller(model: torch.nn.Module, device: torch.device) -> None:
    """Run `model` on `device` whatever device its inputs come from, and hand its outputs (logits)
    back on the inputs' device: callers keep using the student's device for everything."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model, AlignDevicesHook(execution_device=device, io_same_device=True))


def _gather_full_weights(sharded: torch.nn.Module, replica: torch.nn.Module, deepspeed: bool) -> None:
    """Copy a sharded student's full weights into `replica` (collective: every rank calls it)."""
    target = dict(replica.named_parameters())
    if deepspeed:  # ZeRO-3: gather one tensor at a time (bounded extra memory)
        import deepspeed as ds

        for name, p in sharded.module.named_parameters():
            with ds.zero.GatheredParameters([p]):
                target[name].copy_(p.detach())
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(sharded, writeback=False):
        # FSDP strips its own prefix from the names here; activation checkpointing adds another.
        for name, p in sharded.named_parameters():
            target[name.replace("_checkpoint_wrapped_module.", "")].copy_(p.detach())


def _freeze_below(model: torch.nn.Module, top: int) -> None:
    """Freeze everything except the top `top` transformer blocks and the final norm."""
    block = {name: int(m.group(2)) for name, _ in model.named_parameters() if (m := models_mod.LAYER_KEY.match(name))}
    layer_ids = sorted(set(block.values()))
    if not layer_ids:
        raise UserError("models.trainable_layers: cannot find the transformer blocks (*.layers.N / *.h.N) of the student")
    if top > len(layer_ids):
        raise UserError(f"models.trainable_layers: {top} is more than the student's {len(layer_ids)} blocks")
    keep = set(layer_ids[-top:])
    for name, p in model.named_parameters():
        final_norm = name not in block and ("norm" in name or "ln_f" in name)
        p.requires_grad_(block.get(name, -1) in keep or final_norm)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _load_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load full student weights written by `save_pretrained` (one file or an indexed set of shards)."""
    from safetensors.torch import load_file

    index = step_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(step_dir / name)))
    ckpt.check_weights(step_dir)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise UserError(f"{step_dir}: checkpoint does not match the student (shape of {wrong[0]}"
                        f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); resume with the run's own student")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are saved once; anything else missing is a real problem.
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise UserError(f"{step_dir}: checkpoint does not match the student "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")


def _apply_lora(student: torch.nn.Module, recipe: Recipe, resume_dir: Path | None) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise UserError("models.lora.enabled: LoRA needs peft (pip install 'minillm[lora]')") from None
    if resume_dir is not None:
        return peft.PeftModel.from_pretrained(student, str(resume_dir), is_trainable=True)
    lc = recipe.models.lora
    cfg = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                          task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(student, cfg)
    except ValueError as e:
        raise UserError(f"models.lora.target_modules: {e}") from None


@torch.no_grad()
def dev_loss(ctx: Ctx) -> float:
    """Teacher-forced response-token cross-entropy on the dev split (token mean)."""
    from minillm_cli import losses
    from minillm_cli.methods.sft import response_logits

    model = ctx.sampling_model()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = ctx.recipe.train.batch_size
    for i in range(0, len(ctx.dev), bs):
        b = data_mod.collate_pairs(ctx.dev[i : i + bs], ctx.tokenizer.pad_token_id)
        b = {k: v.to(ctx.device) for k, v in b.items()}
        logp = losses.token_logprobs(response_logits(model, b), b["response_ids"], chunk_size=ctx.recipe.train.chunk_size)
        total += float(-(logp * b["response_mask"]).sum())
        count += int(b["response_mask"].sum())
    model.train(was_training)
    return total / max(count, 1)


def dev_eval(ctx: Ctx) -> dict[str, float]:
    """Generation metrics on the dev split with one seed (logged as dev/ numbers)."""
    from minillm_cli.evaluate.generate import evaluate_during_training

    model = ctx.sampling_model()
    return evaluate_during_training(model, ctx.tokenizer, ctx.dev, ctx.recipe.eval, ctx.device)
