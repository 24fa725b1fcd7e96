"""RUN/curves.png: drawn at every checkpoint from metrics.jsonl, never a reason for a run to fail."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from minillm_cli.train.curves import CURVES, METHOD_KEYS, series, write_curves
from tests.helpers import METHOD_EXTRA, train_tiny

PNG = b"\x89PNG"


def _metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn")


def test_series_keeps_the_last_record_of_a_step_and_skips_missing_and_non_finite() -> None:
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "rkl": 5.0}, {"step": 2, "loss": 1.5},
            {"step": 3, "loss": float("nan"), "dev/loss": 2.5}, {"step": "x", "loss": 9.0}]
    s = series(rows, ("loss", "rkl", "dev/loss", "reward"))
    assert s == {"loss": ([1, 2], [3.0, 1.5]), "rkl": ([2], [5.0]), "dev/loss": ([3], [2.5])}


def test_minillm_curves_show_its_quantities(tmp_path: Path) -> None:
    keys = ("loss", "grad_norm", *METHOD_KEYS["minillm"])
    _metrics(tmp_path, [{"step": s, **{k: float(s + i) for i, k in enumerate(keys)}} for s in range(1, 6)])
    assert write_curves(tmp_path, "minillm") is None
    assert (tmp_path / CURVES).read_bytes()[:4] == PNG
    assert not list(tmp_path.glob(".tmp-*"))


def test_nothing_logged_draws_nothing(tmp_path: Path) -> None:
    assert write_curves(tmp_path, "sft") is None and not (tmp_path / CURVES).exists()


def test_without_matplotlib_a_note_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _metrics(tmp_path, [{"step": 1, "loss": 1.0}])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):  # noqa: ANN001, ANN202
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    note = write_curves(tmp_path, "sft")
    assert note is not None and "pip install matplotlib" in note and CURVES in note
    assert not (tmp_path / CURVES).exists()


def test_a_plotting_error_is_a_note_not_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    _metrics(tmp_path, [{"step": 1, "loss": 1.0}])
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    note = write_curves(tmp_path, "sft")
    assert note is not None and "disk full" in note
    assert not (tmp_path / CURVES).exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_training_run_writes_curves_at_its_checkpoints(tmp_path: Path, tiny_dir: Path, tiny_data: Path) -> None:
    run = train_tiny(tiny_dir, tiny_data, tmp_path / "run", "minillm", 2, [*METHOD_EXTRA["minillm"], "train.save_every=1"])
    assert (run / CURVES).read_bytes()[:4] == PNG
    # the run directory still passes its own contract: curves.png is a run file
    from minillm_cli.runs import rundir

    assert all(rundir.is_run_entry(p.name) for p in run.iterdir())
