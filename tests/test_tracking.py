"""`train.report_to`: accelerate's trackers get the run's metrics, its recipe and its final numbers."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from minillm_cli.errors import UserError
from minillm_cli.train.tracking import TRACKING_DIR, check_installed, flat_config
from tests.helpers import train_tiny


def test_a_missing_tracker_is_one_line_naming_the_install(tmp_path: Path, tiny_dir: Path, tiny_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"train.report_to: wandb is not installed: pip install 'minillm\[wandb\]'"):
        check_installed(["tensorboard", "wandb"])
    with pytest.raises(UserError, match="wandb is not installed"):
        train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 2, ["train.report_to=[wandb]"])
    assert not (tmp_path / "run").exists()  # refused before any model work


def test_unknown_tracker_names_the_key(tmp_path: Path, tiny_dir: Path, tiny_data: Path) -> None:
    with pytest.raises(UserError, match="train.report_to"):
        train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 2, ["train.report_to=[neptune]"])


def test_flat_config_is_dotted_scalars() -> None:
    assert flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "train": {"report_to": [], "seed": 1},
                        "models": {"teacher": None}}) == {
        "optim.lr": 1e-3, "optim.betas": "[0.9, 0.95]", "train.report_to": "[]", "train.seed": 1,
        "models.teacher": "None"}


def test_tensorboard_gets_every_step_the_recipe_and_the_final_dev_loss(tmp_path: Path, tiny_dir: Path,
                                                                       tiny_data: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 3,
               ["train.report_to=[tensorboard]", "train.dev_loss_every=3", "data.dev_fraction=0.25"])
    events = sorted((run / TRACKING_DIR).rglob("events.out.tfevents.*"))
    assert events, list((run / TRACKING_DIR).rglob("*"))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    import json

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert all(v == pytest.approx(by_step[s], rel=1e-6) for s, v in scalars["loss"])
    assert "dev/loss" in scalars and "final/dev/loss" in scalars and len(scalars["final/dev/loss"]) == 1
    # the resolved recipe went in as hyper-parameters (accelerate also keeps them as hparams.yml)
    import yaml

    hparams = [yaml.safe_load(p.read_text()) for p in (run / TRACKING_DIR).rglob("hparams.yml")]
    assert len(hparams) == 1 and hparams[0]["method.name"] == "sft" and hparams[0]["train.max_steps"] == 3
    from minillm_cli.runs import rundir

    assert all(rundir.is_run_entry(p.name) for p in run.iterdir())  # tracking/ is a run entry


def _scalar_steps(history: list[tuple[int, float]]) -> list[int]:
    return sorted({s for s, _ in history})


def test_mlflow_local_store_gets_metrics_params_and_final(tmp_path: Path, tiny_dir: Path, tiny_data: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a sqlite store inside the run
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 3,
               ["train.report_to=[mlflow]", "train.dev_loss_every=3", "data.dev_fraction=0.25"])
    uri = f"sqlite:///{(run / TRACKING_DIR / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("minillm")
    assert experiment is not None
    (logged,) = client.search_runs([experiment.experiment_id])
    assert _scalar_steps([(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "loss")]) == [1, 2, 3]
    assert logged.data.params["method.name"] == "sft" and logged.data.params["train.max_steps"] == "3"
    assert "final/dev/loss" in logged.data.metrics


def test_wandb_offline_writes_its_run_inside_the_run_dir(tmp_path: Path, tiny_dir: Path, tiny_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "sft", 3, ["train.report_to=[wandb]"])
    (offline,) = sorted((run / TRACKING_DIR / "wandb").glob("offline-run-*"))
    (records,) = offline.glob("run-*.wandb")  # wandb's own record file, for `wandb sync`
    # the recipe (as config keys) and every logged metric name go into it; wandb's service process
    # writes the file after our process let go of the run, so wait for it (up to a minute under load)
    wanted = [b"method.name", b"train.max_steps", b"grad_norm", b"tok_per_s"]  # history keys: no config key has these names
    deadline = time.monotonic() + 60
    while True:
        data = records.read_bytes()
        missing = [w for w in wanted if w not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"{records} still lacks {missing} after 60 s ({len(data)} bytes)"


@pytest.mark.slow
def test_trackio_local_store_gets_every_step(tmp_path: Path, tiny_dir: Path, tiny_data: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trackio")
    import subprocess
    import sys

    # trackio reads TRACKIO_DIR when first imported: a fresh process, as a user's run is
    out = tmp_path / "run"
    code = (
        "import sys; from tests.helpers import train_tiny; from pathlib import Path; "
        "train_tiny(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), 'sft', 3, ['train.report_to=[trackio]'])"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRACKIO_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(tiny_data), str(out)], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    import sqlite3

    (db,) = (out / TRACKING_DIR / "trackio").glob("*.db")  # trackio's local sqlite store, one per project
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select step, metrics from metrics").fetchall()
    logged = {step: json.loads(blob) for step, blob in rows}
    assert sorted(logged) == [1, 2, 3] and all("loss" in m and "grad_norm" in m for m in logged.values())
