"""The training methods: one module per method, each with one stepper class, and their registry.

A stepper takes one optimizer step's forward and backward (`step`), and saves / restores what it
carries between steps (`state` / `load_state`) for exact resume; the loop owns everything else
(optimizer, schedule, RNG, signals, saving). Adding a method is one module plus one line in `METHODS`
(and its settings section in `config.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from torch import Tensor

from minillm_cli.methods.context import Ctx
from minillm_cli.methods.gkd import GkdStepper
from minillm_cli.methods.kd import KdStepper
from minillm_cli.methods.minillm import MiniLlmStepper
from minillm_cli.methods.seqkd import SeqKdStepper
from minillm_cli.methods.sft import SftStepper


class Stepper(Protocol):
    """What the loop calls on a method (built once per run, after the models and data are loaded)."""

    needs_teacher: ClassVar[bool]
    """Whether the method uses `models.teacher` (checked before anything is loaded)."""

    def __init__(self, ctx: Ctx) -> None: ...

    def step(self) -> dict[str, float]:
        """Forward and backward of one optimizer step (gradients left in the student); its metrics,
        "loss" among them. Raises `context.Interrupted` (via `check_stop`) to abandon the step."""
        ...

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """What the stepper carries to the next step: JSON-serialisable values and tensors."""
        ...

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore what `state` returned (on resume, before the first step)."""
        ...


METHODS: dict[str, type[Stepper]] = {
    "sft": SftStepper,
    "kd": KdStepper,
    "seqkd": SeqKdStepper,
    "gkd": GkdStepper,
    "minillm": MiniLlmStepper,
}
"""`method.name` -> its stepper class (every name of `config.METHOD_NAMES`)."""
