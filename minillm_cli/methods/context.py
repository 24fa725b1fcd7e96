"""The context a method's stepper works in (`Ctx`), and how a stepper abandons a step on a signal.

Built once per run by `loop.train`; methods import this module, never the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from minillm_cli.config.schema import Recipe
from minillm_cli.data import encoding as data_mod
from minillm_cli.models import loading as models_mod
from minillm_cli.parallel.distributed import gather_full_weights

if TYPE_CHECKING:
    from minillm_cli.data.teacher_cache import TeacherCache


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
    console: Any = None
    """The main process's rich console (None elsewhere): progress of long phases (`progress.Phase`)."""
    teacher_cache: TeacherCache | None = None
    """`data.teacher_cache`, opened and checked: kd reads the teacher from it (`teacher` is then None)."""
    teacher_tokenizer: Any = None
    """models.cross_tokenizer: the teacher's tokenizer (None when the two models share one)."""
    teacher_prompts: dict[int, list[int]] | None = None
    """models.cross_tokenizer: each training example's prompt in the teacher's template and ids, by index."""
    _replica: torch.nn.Module | None = None
    _replica_version: int = -1

    @property
    def fsdp(self) -> bool:
        """The student is sharded by FSDP2 (`minillm_cli.fsdp`)."""
        return self.sharded and not self.deepspeed

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
        elif last or self.world == 1 or self.fsdp:
            # FSDP2 reduce-scatters every micro-batch's gradients: each rank keeps only its shard,
            # numel / world per parameter, instead of an unsharded gradient until the last one.
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
            gather_full_weights(self.student, self._replica, self.deepspeed)
            self._replica_version = self.weights_version
        return self._replica


class Interrupted(Exception):
    """Raised by steppers (between decode steps or micro-batches) when a stop was requested."""


def check_stop(ctx: Ctx) -> None:
    """Call inside long method work (rollouts): abandons the step if a signal arrived."""
    if ctx.stop_requested():
        raise Interrupted()
