"""Report rendering: rich table, JSON round trip, --fail-under thresholds, exposure-bias PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from minillm_cli.errors import UserError
from minillm_cli.evaluate.metrics import exposure_bias_curve
from minillm_cli.evaluate.report import (
    EXPOSURE_BIAS,
    EvalReport,
    ModelRow,
    PerPrompt,
    compare,
    exposure_bias_title,
    plot_exposure_bias,
    render_table,
)
from minillm_cli.evaluate.report_json import from_json, to_json, write_json
from minillm_cli.evaluate.thresholds import check_thresholds


def _curve(scale: float) -> dict:
    kl_s = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]) * scale
    ones = np.ones((2, 3))
    return exposure_bias_curve(kl_s, ones, ones, ones)


@pytest.fixture()
def report() -> EvalReport:
    return EvalReport(
        settings={"seeds": [10, 20], "temperature": 1.0, "data": Path("/data/dolly.jsonl"),
                  "metrics": ["rougeL", "ece"]},
        rows=[
            ModelRow("sft", {"rougeL": (23.3, 0.41), "ece": (0.0512, None)}, {EXPOSURE_BIAS: _curve(1.0)}),
            ModelRow("minillm", {"rougeL": (np.float64(24.6), 0.2)}, {EXPOSURE_BIAS: _curve(0.5)}),
        ],
        split="test",
    )


def _text(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def test_render_table(report: EvalReport) -> None:
    text = _text(render_table(report))
    assert "test split" in text
    lines = text.splitlines()
    header = next(line for line in lines if "model" in line)
    assert "rougeL" in header and "ece" in header and header.index("rougeL") < header.index("ece")
    sft = next(line for line in lines if "sft" in line)
    assert "23.30 ± 0.41" in sft and "0.0512" in sft and "±" not in sft.split("0.41")[1]
    minillm = next(line for line in lines if "minillm" in line)
    assert "24.60 ± 0.20" in minillm and "-" in minillm.split("0.20")[1]  # no ece measured


def test_render_table_dev_split() -> None:
    dev = EvalReport(settings={}, rows=[ModelRow("run", {"rougeL": (12.0, None)})], split="dev")
    text = _text(render_table(dev))
    assert "dev split" in text and "12.00" in text and "±" not in text
    with pytest.raises(ValueError):
        EvalReport(settings={}, rows=[], split="train")


def test_json_round_trip(report: EvalReport, tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.json"
    write_json(report, path)
    data = json.loads(path.read_text())
    assert data["split"] == "test"
    assert data["settings"]["data"] == "/data/dolly.jsonl"
    assert data["models"][0]["metrics"]["rougeL"] == {"mean": 23.3, "std": 0.41}
    assert data["models"][0]["metrics"]["ece"] == {"mean": 0.0512, "std": None}
    # minillm's curve: R = 1, 2.5, 4.5 against E = 1, 2, 3
    assert data["models"][1]["curves"][EXPOSURE_BIAS]["exaccerr"] == pytest.approx([0.0, 25.0, 50.0])
    back = from_json(data)
    assert [row.name for row in back.rows] == ["sft", "minillm"]
    assert back.rows[0].metrics == {"rougeL": (23.3, 0.41), "ece": (0.0512, None)}
    assert back.rows[1].curves[EXPOSURE_BIAS]["lengths"] == [1, 2, 3]
    assert to_json(back) == data
    with pytest.raises(UserError):
        from_json({"models": []})


def test_json_writes_nan_as_null(tmp_path: Path) -> None:
    nan_report = EvalReport(settings={"x": (1, 2)}, rows=[ModelRow("m", {"kl": (math.nan, None)})])
    write_json(nan_report, tmp_path / "r.json")  # strict JSON: would raise on NaN
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["models"][0]["metrics"]["kl"]["mean"] is None and data["settings"]["x"] == [1, 2]
    assert check_thresholds(from_json(data), ["kl=0"]) == ["m: kl = n/a < 0 (--fail-under kl=0)"]


def test_thresholds_all_models_and_named(report: EvalReport) -> None:
    assert check_thresholds(report, []) == []
    assert check_thresholds(report, ["rougeL=20"]) == []
    failures = check_thresholds(report, ["rougeL=24"])
    assert failures == ["sft: rougeL = 23.30 < 24 (--fail-under rougeL=24)"]
    assert check_thresholds(report, ["minillm:rougeL=24"]) == []
    assert check_thresholds(report, ["minillm:rougeL=25"])[0].startswith("minillm: rougeL = 24.60 < 25")
    # ece is only measured for sft: the other row fails rather than passing silently
    assert check_thresholds(report, ["ece=0.01"]) == ["minillm: ece was not measured (--fail-under ece=0.01)"]
    assert check_thresholds(report, [" sft : rougeL = 24 "]) != []


@pytest.mark.parametrize("spec", ["rougeL", "rougeL=", "=20", "rougeL=abc", ":rougeL=20", "rougeL=nan"])
def test_thresholds_bad_spec(report: EvalReport, spec: str) -> None:
    with pytest.raises(UserError, match="bad --fail-under spec"):
        check_thresholds(report, [spec])


def test_thresholds_unknown_metric_and_model(report: EvalReport) -> None:
    with pytest.raises(UserError, match=r"unknown metric 'rouge'; available: rougeL, ece"):
        check_thresholds(report, ["rouge=20"])
    with pytest.raises(UserError, match=r"unknown model 'gpt2'; available: sft, minillm"):
        check_thresholds(report, ["gpt2:rougeL=20"])


def test_plot_writes_png(report: EvalReport, tmp_path: Path) -> None:
    path = tmp_path / "plots" / "exposure.png"
    plot_exposure_bias(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


def test_plot_title_names_the_data(report: EvalReport, tmp_path: Path) -> None:
    assert exposure_bias_title(report) == f"Exposure bias ({report.split} split)"
    assert exposure_bias_title(report, "instruct-dev") == "Exposure bias (instruct-dev)"
    plot_exposure_bias(report, tmp_path / "named.png", data_name="instruct-dev")
    assert (tmp_path / "named.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(report: EvalReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_curves = EvalReport(settings={}, rows=[ModelRow("m", {"rougeL": (1.0, None)})])
    with pytest.raises(UserError, match="exposure_bias"):
        plot_exposure_bias(no_curves, tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"needs matplotlib"):
        plot_exposure_bias(report, tmp_path / "y.png")


# --------------------------------------------------------------------------- paired comparisons
def _paired_report() -> EvalReport:
    """Baseline "sft" on 2 prompts × 1 seed; "minillm" is 2 better on both prompts; "noisy" is 1 worse
    on prompt 0 and 3 better on prompt 1 (its columns stored in the other order: matched by index)."""
    sft = ModelRow("sft", {"rougeL": (20.0, None), "ece": (0.1, None)},
                   per_prompt={"rougeL": PerPrompt(index=[0, 1], values=np.array([[10.0, 30.0]]))})
    minillm = ModelRow("minillm", {"rougeL": (22.0, None), "ece": (0.2, None)},
                       per_prompt={"rougeL": PerPrompt(index=[0, 1], values=np.array([[12.0, 32.0]]))})
    noisy = ModelRow("noisy", {"rougeL": (21.0, None)},
                     per_prompt={"rougeL": PerPrompt(index=[1, 0], values=np.array([[33.0, 9.0]]))})
    rows = [sft, minillm, noisy]
    return EvalReport(settings={}, rows=rows, comparison=compare(rows, "sft"))


def test_compare_by_hand() -> None:
    c = _paired_report().comparison
    assert c is not None and c.baseline == "sft" and set(c.differences) == {"minillm", "noisy"}
    m = c.differences["minillm"]["rougeL"]
    assert (m.diff, m.low, m.high, m.prompts) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 2)
    # noisy: per-prompt differences -1 and +3; resample means -1 (p 1/4), 1 (1/2), 3 (1/4)
    n = c.differences["noisy"]["rougeL"]
    assert (n.diff, n.low, n.high) == (pytest.approx(1.0), pytest.approx(-1.0), pytest.approx(3.0))
    assert n.within_noise and not m.within_noise
    assert "ece" not in c.differences["minillm"]  # no per-prompt values: no interval
    with pytest.raises(UserError, match="--baseline 'gpt2': no such model; available: sft, minillm, noisy"):
        compare(_paired_report().rows, "gpt2")


def test_comparison_table_says_within_noise() -> None:
    text = _text(render_table(_paired_report()))
    assert "Difference to sft" in text and "paired bootstrap" in text and "2000 resamples of 2 prompts" in text
    lines = text.splitlines()
    minillm = [line for line in lines if line.lstrip("│ ").startswith("minillm")][-1]
    noisy = [line for line in lines if line.lstrip("│ ").startswith("noisy")][-1]
    assert "+2.00 [+2.00, +2.00]" in minillm and "within noise" not in minillm
    assert "+1.00 [-1.00, +3.00] within noise" in noisy
    assert "within noise" not in _text(render_table(EvalReport(settings={}, rows=_paired_report().rows)))


def test_comparison_json_round_trip(tmp_path: Path) -> None:
    report = _paired_report()
    write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    c = data["comparison"]
    assert c["baseline"] == "sft" and c["resamples"] == 2000 and c["confidence"] == 0.95 and "bootstrap" in c["method"]
    assert c["models"]["noisy"]["rougeL"] == {"diff": pytest.approx(1.0), "low": pytest.approx(-1.0),
                                              "high": pytest.approx(3.0), "prompts": 2, "within_noise": True}
    assert c["models"]["minillm"]["rougeL"]["within_noise"] is False
    assert "per_prompt" not in json.dumps(data)  # per-prompt arrays stay in memory
    back = from_json(data)
    assert back.comparison is not None and back.comparison.differences == report.comparison.differences
    assert to_json(back) == data


def test_fail_under_on_the_difference_to_the_baseline() -> None:
    report = _paired_report()
    # lower ends: minillm +2, noisy -1
    failures = check_thresholds(report, ["rougeL@baseline=0"])
    assert len(failures) == 1 and failures[0].startswith("noisy: rougeL - sft = +1.00 [-1.00, +3.00] within noise")
    assert "lower end -1.00 < 0" in failures[0]
    assert check_thresholds(report, ["minillm:rougeL@baseline=2"]) == []
    assert check_thresholds(report, ["minillm:rougeL@baseline=2.5"]) != []
    assert check_thresholds(report, ["noisy:rougeL@baseline=-1"]) == []
    assert check_thresholds(report, ["ece@baseline=0"]) == [
        "minillm: ece has no paired difference to sft (--fail-under ece@baseline=0)",
        "noisy: ece has no paired difference to sft (--fail-under ece@baseline=0)"]
    with pytest.raises(UserError, match="is the baseline itself"):
        check_thresholds(report, ["sft:rougeL@baseline=0"])
    with pytest.raises(UserError, match="unknown model 'gpt2'; compared: minillm, noisy"):
        check_thresholds(report, ["gpt2:rougeL@baseline=0"])
    with pytest.raises(UserError, match="needs --baseline"):
        check_thresholds(EvalReport(settings={}, rows=report.rows), ["rougeL@baseline=0"])


def test_short_names_tell_rows_apart() -> None:
    from minillm_cli.evaluate.report import short_names

    names = ["runs/ab/kd/step-000048", "runs/ab/gkd/step-000048", "/x/runs/ab/teacher (teacher)",
             "runs/ab/warmup/step-000080", "other/kd/step-000048", "sft"]
    short = short_names(names)
    assert short["runs/ab/gkd/step-000048"] == "gkd/step-000048"
    assert short["runs/ab/warmup/step-000080"] == "warmup/step-000080"
    # two runs named kd under different parents: one more part each
    assert short["runs/ab/kd/step-000048"] == "ab/kd/step-000048"
    assert short["other/kd/step-000048"] == "other/kd/step-000048"
    assert short["/x/runs/ab/teacher (teacher)"] == "teacher (teacher)"
    assert short["sft"] == "sft"
    assert len(set(short.values())) == len(names)


def test_wide_tables_fold_by_metric_and_list_full_paths_once() -> None:
    metrics = {f"metric_{i}": (10.0 + i, 0.5) for i in range(8)}
    rows = [ModelRow(f"runs/study/{name}/step-000048", dict(metrics)) for name in ("kd", "gkd", "minillm")]
    report = EvalReport(settings={}, rows=rows, split="test")
    console = Console(record=True, width=80)
    console.print(render_table(report, width=80))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for i in range(8):  # every metric shown, each number whole on one line
        assert f"metric_{i}" in text and f"{10.0 + i:.2f} ± 0.50" in text
    header_lines = [line for line in lines if "model" in line]
    assert len(header_lines) >= 2  # folded into several tables
    assert sum("minillm/step-000048" in line for line in lines if line.strip().startswith("│")) == len(header_lines)
    assert text.count("runs/study/minillm/step-000048") == 1  # the full path, listed once
    narrow = Console(record=True, width=200)
    narrow.print(render_table(report, width=200))
    assert sum("model" in line for line in narrow.export_text().splitlines()) == 1  # fits: one table
