"""The benchmark scripts run end to end on tiny models, and the performance fixes they motivated
(length-grouped training rows, the rollout's teacher log-probs) keep the numbers they replace."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm_cli.methods.batching import length_groups, response_logits, take_group
from minillm_cli.sampling.batch import score
from minillm_cli.sampling.rollout import sample

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tiny_dir):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher").eval()
    return student, teacher


def _batch() -> dict[str, torch.Tensor]:
    """Left-padded prompts of lengths 2..9 and right-padded responses of lengths 1..5."""
    gen = torch.Generator().manual_seed(0)
    p_len, t_len = [9, 2, 5, 7, 3, 8], [1, 5, 3, 2, 4, 5]
    prompt_ids = torch.randint(3, 300, (6, 9), generator=gen)
    response_ids = torch.randint(3, 300, (6, 5), generator=gen)
    prompt_mask = torch.tensor([[0] * (9 - n) + [1] * n for n in p_len])
    response_mask = torch.tensor([[1] * n + [0] * (5 - n) for n in t_len])
    return {"prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, 2), "prompt_mask": prompt_mask,
            "response_ids": response_ids.masked_fill(response_mask == 0, 2), "response_mask": response_mask}


def test_length_groups_cover_every_row_once_within_budget() -> None:
    b = _batch()
    groups = length_groups(b["prompt_mask"], b["response_mask"], max_tokens=24)
    rows = sorted(i for g, _, _ in groups for i in g.tolist())
    assert rows == list(range(6))
    for g, p, t in groups:
        assert p == int(b["prompt_mask"][g].sum(-1).max()) and t == int(b["response_mask"][g].sum(-1).max())
        assert len(g) == 1 or len(g) * (p + t) <= 24
    assert len(groups) > 1  # the budget really splits this batch
    # one row per group at the smallest budget, the whole batch in one group at a large one
    assert len(length_groups(b["prompt_mask"], b["response_mask"], max_tokens=1)) == 6
    assert len(length_groups(b["prompt_mask"], b["response_mask"], max_tokens=10_000)) == 1


def test_grouped_logits_equal_the_whole_batch(models) -> None:  # noqa: ANN001
    student, _ = models
    b = _batch()
    with torch.no_grad():
        whole = response_logits(student, b)  # (B, T, V)
        for g, p, t in length_groups(b["prompt_mask"], b["response_mask"], max_tokens=24):
            part = response_logits(student, take_group(b, g, p, t))  # (b, t, V)
            valid = b["response_mask"][g, :t].bool()
            torch.testing.assert_close(part[valid], whole[g, :t][valid], atol=1e-5, rtol=1e-5)


def test_rollout_teacher_logprobs_are_the_teacher_forced_ones(models) -> None:  # noqa: ANN001
    student, teacher = models
    b = _batch()
    roll = sample(student, b["prompt_ids"], b["prompt_mask"], teacher=teacher, alpha=0.3, max_new_tokens=6,
                  eos_token_id=[299], pad_token_id=2, generator=torch.Generator().manual_seed(1),
                  keep_teacher_logprobs=True)
    assert roll.teacher_logprobs is not None and roll.logp is not None
    assert roll.teacher_logprobs.shape == (*roll.response_ids.shape, student.config.vocab_size)
    with torch.no_grad():
        forced = response_logits(teacher, {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask,
                                           "response_ids": roll.response_ids, "response_mask": roll.response_mask})
        logp = score(teacher, roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask)
    valid = roll.response_mask.bool()
    torch.testing.assert_close(roll.teacher_logprobs[valid], forced.log_softmax(-1)[valid], atol=1e-4, rtol=1e-4)
    picked = roll.teacher_logprobs.gather(-1, roll.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked[valid], roll.logp[valid])
    torch.testing.assert_close(roll.logp, logp, atol=1e-4, rtol=1e-4)
    without = sample(student, b["prompt_ids"], b["prompt_mask"], teacher=teacher, alpha=0.3, max_new_tokens=6,
                     eos_token_id=[299], pad_token_id=2, generator=torch.Generator().manual_seed(1))
    assert without.teacher_logprobs is None and torch.equal(without.response_ids, roll.response_ids)


def test_memory_scaling_ours_and_dense_agree_in_value() -> None:
    mem = _load("memory_scaling")
    for loss in ("reverse_kl", "forward_kl"):
        ours, dense = (mem.measure(impl, loss, 1, 6, 50) for impl in ("ours", "dense"))
        # (the byte figures are only meaningful in the fresh process the script gives each configuration)
        assert ours["T"] == 6 and ours["V"] == 50 and isinstance(ours["extra_bytes"], int)
        assert ours["value"] == pytest.approx(dense["value"], rel=1e-5)


def test_flop_model_counts_the_head_only_at_generated_tokens() -> None:
    bench = _load("vs_trl")
    shape = {"body": 10, "head": 100, "total": 110}
    # 2·S·(P+G) + 2·H·G for the student forward; x3 for its training pass; the same forward for the teacher
    student_fwd = 2 * 10 * (3 + 2) + 2 * 100 * 2
    assert bench.step_flops("gkd", shape, shape, 3, 2) == student_fwd * 5
    assert bench.step_flops("minillm", shape, shape, 3, 2) == student_fwd * 6


@pytest.mark.slow
def test_bench_runs_end_to_end_on_tiny_models(tmp_path, tiny_dir, tiny_data) -> None:  # noqa: ANN001
    has_trl = importlib.util.find_spec("trl") is not None
    sides = "gkd,minillm,minillm-lockstep,gkd-untuned" + (",trl,trl-tuned" if has_trl else "")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "vs_trl.py"), "--data", str(tiny_data),
           "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"), "--batch", "2",
           "--new-tokens", "6", "--steps", "1", "--warmup", "1", "--sides", sides, "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    for side in sides.split(","):
        s = result["summary"][side]
        assert s["step_s"] > 0 and s["tok_per_s"] > 0 and s["rss_train_mib"] > 50 and 0 < s["mfu"] < 1
        assert s["profile"]["rollout"] > 0 and s["profile"]["backward"] > 0 and s["profile"]["optimizer"] > 0
    assert "s/step (median)" in run.stdout and "Profile" in run.stdout
    assert "CPU process settings on / off" in run.stdout
    assert not has_trl or ("minillm gkd / trl:" in run.stdout and "minillm gkd / trl-tuned:" in run.stdout)
    # the teacher-mixed sides: lockstep runs the teacher once per token, the speculative one less
    lock, spec = result["summary"]["minillm-lockstep"], result["summary"]["minillm"]
    assert lock["teacher_calls_per_token"] == 1.0 and lock["draft_accept"] is None
    assert spec["speculative_tokens"] > 0 and 0 < spec["draft_accept"] <= 1
    assert spec["teacher_calls_per_token"] < 1.0
    assert "teacher calls / gen token" in run.stdout


@pytest.mark.slow
def test_speculative_bench_runs_on_tiny_models(tmp_path, tiny_dir, tiny_data) -> None:  # noqa: ANN001
    out = tmp_path / "spec.json"
    cmd = [sys.executable, str(REPO / "bench" / "speculative.py"), "--data", str(tiny_data),
           "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"), "--batch", "4",
           "--batches", "2", "--new-tokens", "8", "--ks", "0,3", "--repeats", "2", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 * 2 * 2  # settings × batches × repeats
    lock = [r for r in records if r["k"] == 0]
    spec = [r for r in records if r["k"] == 3]
    assert all(r["teacher_row_calls"] == r["tokens"] and r["drafts_checked"] == 0 for r in lock)
    assert sum(r["teacher_row_calls"] for r in spec) < sum(r["tokens"] for r in spec)
    assert "| 3 |" in run.stdout and "(lockstep)" in run.stdout


@pytest.mark.slow
def test_xtok_bench_runs_on_tiny_models(tmp_path, tiny_dir, tiny_data) -> None:  # noqa: ANN001
    """bench/xtok.py --smoke: tokenizer, fresh student, warm-up, both arms, eval across tokenizers, cost."""
    out = tmp_path / "xtok"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "xtok.py"), "--smoke", "--teacher", str(tiny_dir / "teacher"),
                          "--data", str(tiny_data), "--eval-data", str(tiny_data), "--out", str(out), "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "minillm-xtok minus sft-continued" in summary and "cross-tokenizer" in summary
    report = json.loads((out / "eval.json").read_text())
    assert any("rkl_seq_student" in m["metrics"] for m in report["models"])
