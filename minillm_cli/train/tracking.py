"""Experiment trackers (`train.report_to`) through accelerate's tracker API — no hand-written client.

`check_installed` runs before any model work, so asking for a tracker whose package is missing is a
one-line error naming the `pip install` to run. On the main process only, `Trackers` starts one
accelerate tracker per name with the resolved recipe as its configuration, logs every metrics record
the loop logs (the same numbers as metrics.jsonl) and, once, the run's final dev numbers, and ends
them however the run ends (a context manager around the loop).

Where they write, unless the environment already says otherwise: tensorboard into RUN/tracking/,
mlflow into a sqlite store RUN/tracking/mlflow.db (MLFLOW_TRACKING_URI), wandb's local files into
RUN/tracking (WANDB_DIR; WANDB_MODE=offline keeps a run off the network), trackio's local store into
RUN/tracking/trackio (TRACKIO_DIR, read when trackio is first imported in the process).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""`train.report_to` name -> the package that must be importable (and the minillm extra that installs it)."""
TRACKING_DIR = "tracking"
PROJECT = "minillm"


def check_installed(names: Sequence[str]) -> None:
    """A one-line error for the first requested tracker whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"train.report_to: {name} is not installed: pip install 'minillm[{name}]'")


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as {dotted.key: scalar}: what tracker hyper-parameter views accept (lists and
    None become strings)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Trackers:
    """The run's trackers (none when `names` is empty or off the main process)."""

    def __init__(self, accelerator: Any, names: Sequence[str], run_dir: Path, config: dict[str, Any]) -> None:
        self.accelerator = accelerator
        self.active = bool(names) and accelerator.is_main_process
        self.step = 0
        self.final: dict[str, float] = {}
        """The last dev numbers seen (`log`), logged once more as the run's final ones."""
        if not self.active:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        logging_dir = run_dir / TRACKING_DIR
        logging_dir.mkdir(exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(logging_dir))
        os.environ.setdefault("TRACKIO_DIR", str(logging_dir / "trackio"))  # read when trackio is first imported
        # mlflow 3 refuses a new file store; a sqlite file is its recommended local backend
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(logging_dir / 'mlflow.db').resolve()}")
        trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "mlflow":
                trackers.append(cls(experiment_name=PROJECT, run_name=run_dir.name))
            elif cls.requires_logging_directory:
                trackers.append(cls(run_dir.name, logging_dir))
            else:
                trackers.append(cls(run_dir.name))
        # Ready-made trackers are taken as they are by init_trackers (accelerate's own API), which starts
        # them and stores the configuration; the accelerator was built before the run dir existed.
        accelerator.log_with = trackers
        accelerator.init_trackers(PROJECT, config=flat_config(config))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record, as written to metrics.jsonl (numbers only); dev numbers are also kept for the end."""
        self.step = step
        if self.active:
            values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.final.update({k: v for k, v in values.items() if k.startswith("dev")})
            if values:
                self.accelerator.log(values, step=step)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        """However the run ends: log its last dev numbers once (prefixed `final/`), end every tracker."""
        if not self.active:
            return
        self.active = False
        if self.final:
            self.accelerator.log({f"final/{k}": v for k, v in self.final.items()}, step=self.step)
        self.accelerator.end_training()
