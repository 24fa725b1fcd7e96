"""The one training loop shared by every method (sft, kd, seqkd, gkd, minillm).

`train(recipe, source)` reads top to bottom, like litgpt's setup -> main -> fit: set up the run
(`train.setup`: run dir, models, data) -> prepare (sharding, optimizer, the method's stepper,
`_prepare`) -> (resume) -> fit: lr, step, clip, check, update, log, dev loss / dev eval, save -> final
save (`_fit`). A method is a "stepper" (`methods.Stepper`, looked up in
`methods.METHODS`) with `step() -> metrics` (forward + backward of one optimizer step), `state()` and
`load_state()` for exact resume; the loop owns the optimizer, schedule, RNG, signals and saving
(`train_state.Checkpointer`).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from minillm_cli.config.schema import Recipe
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import RunStopped
from minillm_cli.losses import logprobs
from minillm_cli.methods import METHODS
from minillm_cli.methods.batching import response_logits
from minillm_cli.methods.context import Ctx, Interrupted
from minillm_cli.models import cpu_tuning
from minillm_cli.models import loading as models_mod
from minillm_cli.parallel import fsdp
from minillm_cli.parallel.distributed import any_rank, is_deepspeed, is_sharded, reduce_metrics
from minillm_cli.progress import Progress
from minillm_cli.runs import checkpoint as ckpt
from minillm_cli.runs import rundir
from minillm_cli.train.setup import set_up
from minillm_cli.train.signals import StopSignals
from minillm_cli.train.state import Checkpointer, State
from minillm_cli.train.tracking import Trackers, check_installed


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


def train(recipe: Recipe, source: dict[str, str], *, resume: bool = False, extend: bool = False,
          console: Console | None = None) -> Path:
    """Run one training job (any method) described by `recipe`; returns the run directory.

    Args:
        resume: continue the run in `output.dir` from its newest intact checkpoint; the recipe must
            be the run's own (`resume_check.check_resume`).
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
    """setup -> prepare -> fit, as in the module docstring."""
    import transformers
    from accelerate import Accelerator

    transformers.utils.logging.disable_progress_bar()  # our own progress view is the only one
    console = console or Console()
    t_setup = time.time()
    tr = recipe.train
    check_installed(tr.report_to)  # before any model work
    if tr.threads:
        torch.set_num_threads(tr.threads)
    accelerator = Accelerator(cpu=models_mod.pick_device(recipe.models.device).type == "cpu")
    # Messages hold paths and user text: printed as they are, never read as rich markup.
    say = (lambda s: console.print(s, highlight=False, markup=False, soft_wrap=True)) if accelerator.is_main_process else (lambda s: None)
    run = set_up(recipe, source, accelerator, resume, extend, say, claims)
    job = _prepare(recipe, run, accelerator, console, say)
    cpu_tuning.tune_for_cpu(job.ctx.device.type)
    start_step, bad_total = 0, 0
    if run.resume_state is not None:
        start_step, bad_total = job.checkpoints.restore(run.resume_state)
        say(f"resumed from {run.resume_dir} (step {start_step})")
    say(f"run dir: {run.run_dir}  (setup {time.time() - t_setup:.1f}s, {len(run.train)} train / {len(run.dev)} dev "
        f"examples, device {job.ctx.device}, dtype {str(run.dtype).replace('torch.', '')}; resolved recipe in "
        f"{run.run_dir / 'recipe.yaml'})")
    # Freed memory is kept for reuse inside the steps only, and given back after them (cpu_tuning).
    with cpu_tuning.keep_freed_memory(job.ctx.device.type, accelerator.num_processes):
        final = _fit(recipe, job, console, start_step, bad_total, resumed=run.resume_state is not None)
    say(f"done: {tr.max_steps} steps; final checkpoint {final}")
    return run.run_dir


@dataclass
class _Job:
    """What the loop works with: the method's context and stepper, the optimizer, how to clip, how to save."""

    ctx: Ctx
    stepper: Any
    optimizer: torch.optim.Optimizer
    clip: Callable[[], float]
    """Clip the gradients to optim.grad_clip; returns the norm before clipping."""
    checkpoints: Checkpointer
    signals: StopSignals


def _prepare(recipe: Recipe, run: Any, accelerator: Any, console: Console, say: Callable[[str], None]) -> _Job:
    """Shard or wrap the student (and a sharded teacher), build the optimizer, the RNG and the method's
    stepper, and the checkpointer."""
    tr, m, o = recipe.train, recipe.models, recipe.optim
    device, world = accelerator.device, accelerator.num_processes
    deepspeed, sharded = is_deepspeed(accelerator), is_sharded(accelerator)
    settings = fsdp.fsdp_settings() if sharded and not deepspeed else None
    teacher = run.teacher
    if settings is not None:
        # FSDP2 by minillm, never through accelerator.prepare (fsdp.py: accelerate cannot on CPUs).
        # The optimizer is built on the sharded parameters (DTensors), so its moments are sharded too.
        student = fsdp.shard(run.student, accelerator, settings, train=True)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = _adamw(params, recipe)
        if teacher is not None and m.teacher_placement == "sharded":
            teacher = fsdp.shard(teacher, accelerator, settings, train=False)
            teacher.eval()
        clip = lambda: fsdp.grad_norm(params, o.grad_clip)  # noqa: E731
    else:
        params = [p for p in run.student.parameters() if p.requires_grad]
        optimizer = _adamw(params, recipe)
        if deepspeed:  # DeepSpeed sizes its engine from the micro-batch; accumulation is ours (Ctx.backward)
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tr.batch_size
        student, optimizer = accelerator.prepare(run.student, optimizer)
        clip_params = list(student.parameters()) if deepspeed else params
        clip = lambda: _clip(accelerator, clip_params, o.grad_clip, deepspeed)  # noqa: E731

    gen = torch.Generator(device=device)
    gen.manual_seed(tr.seed + accelerator.process_index)  # each rank draws its own samples
    torch.manual_seed(tr.seed)
    signals = StopSignals(repeat_grace=2.0 if world > 1 else 0.0)
    main = accelerator.is_main_process
    ctx = Ctx(
        recipe=recipe, accelerator=accelerator, student=student, teacher=teacher, tokenizer=run.tokenizer,
        train=run.train, dev=run.dev, corpus=run.corpus, run_dir=run.run_dir, device=device, gen=gen, vocab=run.vocab,
        # Several processes stop together, at a step boundary (see the loop); one may stop mid-step.
        stop_requested=signals.requested if world == 1 else (lambda: False), print=say,
        sharded=sharded, deepspeed=deepspeed, console=console if main else None, teacher_cache=run.teacher_cache,
        teacher_tokenizer=run.teacher_tokenizer, teacher_prompts=run.teacher_prompts,
    )
    stepper = METHODS[recipe.method.name](ctx)
    checkpoints = Checkpointer(ctx, optimizer, stepper, run.recipe_text, run.meta(recipe))
    return _Job(ctx=ctx, stepper=stepper, optimizer=optimizer, clip=clip, checkpoints=checkpoints, signals=signals)


def _fit(recipe: Recipe, job: _Job, console: Console, start_step: int, bad_total: int, resumed: bool) -> Path | None:
    """The loop: lr, step, clip, check, update, log, dev numbers, save; returns the final checkpoint."""
    tr = recipe.train
    ctx, optimizer, signals = job.ctx, job.optimizer, job.signals
    snapshot, save = job.checkpoints.snapshot, job.checkpoints.save
    accelerator = ctx.accelerator
    dev_metrics: dict[str, float] = {}
    consecutive_bad = 0
    step = start_step
    last_saved = start_step if resumed else -1
    trackers = Trackers(accelerator, tr.report_to, ctx.run_dir, recipe.model_dump(mode="json", by_alias=True))
    with signals, trackers, Progress(ctx.run_dir, tr.max_steps, f"minillm {recipe.method.name}", console, start_step,
                                     accelerator.is_main_process, on_log=trackers.log) as progress:
        while step < tr.max_steps:
            safe_state = snapshot(step, bad_total)  # what is saved if a signal interrupts this step
            lr = lr_at(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            try:
                metrics = job.stepper.step()
            except Interrupted:
                optimizer.zero_grad(set_to_none=True)
                _finish_interrupted(signals, step, last_saved, safe_state, save, dev_metrics, ctx.print)
            grad_norm = job.clip()
            if not _update(recipe, optimizer, step, float(metrics.get("loss", 0.0)), grad_norm, ctx.print):
                consecutive_bad, bad_total, step = consecutive_bad + 1, bad_total + 1, step + 1
                if consecutive_bad >= tr.max_bad_steps:
                    raise RunStopped(f"stopped: {consecutive_bad} consecutive steps with a non-finite loss or gradient "
                                     f"(last at step {step}); lower optim.lr or check the data", exit_code=1)
                continue
            consecutive_bad = 0
            ctx.weights_version += 1
            step += 1
            metrics.update(lr=lr, grad_norm=grad_norm, step_time=time.time() - t0, bad_steps=bad_total)
            _log_and_evaluate(recipe, ctx, progress, step, metrics, dev_metrics)
            if any_rank(accelerator, signals.requested()):
                _finish_interrupted(signals, step, last_saved, snapshot(step, bad_total), save, dev_metrics, ctx.print,
                                    completed=True)
            if tr.save_every and step % tr.save_every == 0 and step < tr.max_steps:
                save(step, *snapshot(step, bad_total), dev_metrics)
                last_saved = step
        return save(step, *snapshot(step, bad_total), dev_metrics) if last_saved != step \
            else ckpt.latest_step_dir(ctx.run_dir)


def _update(recipe: Recipe, optimizer: torch.optim.Optimizer, step: int, loss: float, grad_norm: float,
            say: Callable[[str], None]) -> bool:
    """Apply the optimizer step, or skip it (False) when the loss or the gradient is not finite."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        say(f"step {step + 1}: non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}); step skipped")
        return False
    try:
        optimizer.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise RunStopped(f"stopped at step {step + 1}: the optimizer's update overflows the weights' dtype "
                         f"(optim.lr={recipe.optim.lr:g} is far too large); nothing of this step was saved",
                         exit_code=1) from None
    optimizer.zero_grad(set_to_none=True)
    return True


def _log_and_evaluate(recipe: Recipe, ctx: Ctx, progress: Progress, step: int, metrics: dict[str, Any],
                      dev_metrics: dict[str, float]) -> None:
    """Log the step's metrics (mean over ranks) and, at their cadence, the dev loss and dev evaluation."""
    tr = recipe.train
    if step % tr.log_every == 0 or step == tr.max_steps:
        progress.log(step, reduce_metrics(ctx.accelerator, metrics))
    if tr.dev_loss_every and step % tr.dev_loss_every == 0 and ctx.dev:
        dev_metrics["dev/loss"] = dev_loss(ctx)
        progress.log(step, {"dev/loss": dev_metrics["dev/loss"]})
    if recipe.eval.every and step % recipe.eval.every == 0 and ctx.dev:
        dev_metrics.update(dev_eval(ctx))
        progress.log(step, dict(dev_metrics))


def _finish_interrupted(signals: StopSignals, step: int, last_saved: int, state_and_tensors: State, save: Callable,
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


def _adamw(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _clip(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float | None, sharded: bool = False) -> float:
    if sharded:
        # DeepSpeed: each rank holds a part of the gradient and only DeepSpeed knows the global norm;
        # an infinite max_norm measures without clipping. DeepSpeed has already clipped.
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        return float(norm) if norm is not None else 0.0
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@torch.no_grad()
def dev_loss(ctx: Ctx) -> float:
    """Teacher-forced response-token cross-entropy on the dev split (token mean)."""
    model = ctx.sampling_model()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = ctx.recipe.train.batch_size
    for i in range(0, len(ctx.dev), bs):
        b = data_mod.collate_pairs(ctx.dev[i : i + bs], ctx.tokenizer.pad_token_id)
        b = {k: v.to(ctx.device) for k, v in b.items()}
        logp = logprobs.token_logprobs(response_logits(model, b), b["response_ids"], chunk_size=ctx.recipe.train.chunk_size)
        total += float(-(logp * b["response_mask"]).sum())
        count += int(b["response_mask"].sum())
    model.train(was_training)
    return total / max(count, 1)


def dev_eval(ctx: Ctx) -> dict[str, float]:
    """Generation metrics on the dev split with one seed (logged as dev/ numbers)."""
    from minillm_cli.evaluate.generate import evaluate_during_training

    model = ctx.sampling_model()
    return evaluate_during_training(model, ctx.tokenizer, ctx.dev, ctx.recipe.eval, ctx.device)
