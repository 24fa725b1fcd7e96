"""The training state of a run between two optimizer steps, and its checkpoints.

A step's state is the trainer's counters, the optimizer, the RNGs and the stepper's own state
(`Checkpointer.snapshot`); `save` writes it with the student's weights as one checkpoint (collective:
every rank calls it), `restore` puts a loaded checkpoint's state back for an exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm_cli.errors import RunStopped
from minillm_cli.methods import Stepper
from minillm_cli.methods.context import Ctx
from minillm_cli.models import cpu_tuning
from minillm_cli.parallel import fsdp
from minillm_cli.parallel.distributed import any_rank
from minillm_cli.runs import checkpoint as ckpt
from minillm_cli.train.curves import write_curves

State = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""(trainer_state.json content, tensors) of one step."""


def rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.sampling": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(gen: torch.Generator, tensors: dict[str, torch.Tensor]) -> None:
    gen.set_state(tensors["rng.sampling"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of this process is finite (one fused reduction per dtype group); of a
    sharded (FSDP2) model, this process's slices."""
    params = [fsdp.local(p.detach()) for p in model.parameters()]
    params = [p for p in params if p.numel()]
    if not params:
        return True
    return all(bool(torch.isfinite(n)) for n in torch._foreach_norm(params))


@dataclass
class Checkpointer:
    """Snapshots, saves and restores the state of one run (`ctx.student` is the prepared model)."""

    ctx: Ctx
    optimizer: torch.optim.Optimizer
    stepper: Stepper
    recipe_text: str
    meta: dict[str, Any]
    """The run's part of meta.json (`run_setup.Setup.meta`)."""
    curves_note: str | None = None
    """The last note of `write_curves` printed (why curves.png was not drawn), to say it once."""

    @property
    def saves_optimizer(self) -> bool:
        # Data parallel: the optimizer state is the same on every rank, rank 0 saves it. FSDP: each rank
        # saves its own shard. DeepSpeed keeps the state in its own format (such runs cannot resume).
        return not self.ctx.deepspeed and (self.ctx.accelerator.is_main_process or self.ctx.sharded)

    def snapshot(self, step: int, bad: int) -> State:
        ctx = self.ctx
        opt_state = self.optimizer.state_dict() if self.saves_optimizer else None
        if opt_state is not None and ctx.fsdp:
            opt_state = fsdp.local_optimizer_state(opt_state)  # this rank's slices of the moments
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(opt_state) if opt_state is not None else ({}, None)
        method_json, method_tensors = self.stepper.state()
        state = {"step": step, "data_pos": ctx.data_pos, "bad_steps": bad, "world_size": ctx.world,
                 "optimizer": opt_meta, "method": method_json}
        return state, {**opt_tensors, **rng_tensors(ctx.gen), **method_tensors}

    def restore(self, saved: State) -> tuple[int, int]:
        """Put a checkpoint's state back; returns (step, bad steps so far)."""
        state, tensors = saved
        self.ctx.data_pos = state["data_pos"]
        self.optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, state["optimizer"]))
        if self.ctx.fsdp:
            fsdp.reshard_optimizer_state(self.optimizer)
        restore_rng(self.ctx.gen, tensors)
        self.stepper.load_state(state.get("method", {}), tensors)
        return state["step"], state.get("bad_steps", 0)

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor],
             dev_metrics: dict[str, float]) -> Path | None:
        """Write one checkpoint (collective); its path on the main process, None elsewhere."""
        ctx = self.ctx
        accelerator, run_dir, recipe = ctx.accelerator, ctx.run_dir, ctx.recipe
        main = accelerator.is_main_process
        path = None
        if any_rank(accelerator, not weights_finite(ctx.student)):
            prev = ckpt.latest_step_dir(run_dir)
            kept = f"the last checkpoint {prev.name} is intact" if prev else "no checkpoint was saved"
            raise RunStopped(f"stopped at step {step}: the student's weights are no longer finite (NaN or inf), "
                             f"so they were not saved; {kept}; lower optim.lr (now {recipe.optim.lr:g})", exit_code=1)
        full_weights = None  # collective gathers of a sharded student's full weights (rank 0 keeps them)
        if ctx.fsdp:
            full_weights = fsdp.full_state_dict(ctx.student)
        elif ctx.sharded:
            full_weights = accelerator.get_state_dict(ctx.student)
        if not main:  # each rank's RNG / rollout buffer; the main process moves it into the step dir
            ckpt.stage_rank_state(run_dir, step, accelerator.process_index, tensors, state["method"])
        accelerator.wait_for_everyone()
        if main:
            # The training steps' freed memory goes back first: writing copies the weights and the
            # optimizer state, which should not come on top of the steps' high-water mark (cpu_tuning).
            cpu_tuning.give_back_free_memory(ctx.device.type)
            meta = {**self.meta, **ctx.extra_meta, "step": step, "dev_metrics": dev_metrics}
            path = ckpt.save_checkpoint(
                run_dir, step, model=accelerator.unwrap_model(ctx.student), tokenizer=ctx.tokenizer,
                recipe_text=self.recipe_text, meta=meta, trainer_state=state, state_tensors=tensors,
                keep_last=recipe.train.keep_last, world_size=ctx.world, model_state_dict=full_weights,
            )
            note = write_curves(run_dir, recipe.method.name)  # RUN/curves.png, redrawn at every checkpoint
            if note and note != self.curves_note:
                ctx.print(note)
                self.curves_note = note  # said once, not at every checkpoint
        accelerator.wait_for_everyone()
        return path
