"""Cross-tokenizer runs (`models.cross_tokenizer`) on real (tiny) Hugging Face tokenizers: the text
round trip and its rules, the alignment of rewards, and minillm / seqkd / eval / plan end to end with a
student whose tokenizer is not the teacher's. The gradient itself: tests/test_xtok_exact.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillm_cli.data import retokenize
from tests.helpers import cli, refused, same_weights, weights
from tests.tiny import make_llama, make_tokenizer

XTOK = ["models.cross_tokenizer=true", "method.teacher_mix=0", "method.single_step=false"]


@pytest.fixture(scope="module")
def other(tmp_path_factory, tiny_dir) -> Path:
    """A student of another tokenizer: a byte-level BPE of 300 ids (the tiny teacher's has 320)."""
    root = tmp_path_factory.mktemp("other")
    make_tokenizer(root / "tokenizer", vocab_size=300)
    make_llama(root / "student", root / "tokenizer", layers=2, hidden=32, seed=4)
    return root / "student"


@pytest.fixture(scope="module")
def warm_other(tmp_path_factory, other, tiny_data) -> Path:
    """`other` after a short SFT on the (ASCII) tiny data: a random byte-level model writes invalid
    UTF-8 most of the time, which cross-tokenizer scoring drops (test_text_that_does_not_survive...)."""
    from minillm_cli.runs.checkpoint import latest_step_dir

    out = tmp_path_factory.mktemp("warm") / "run"
    code, log = cli("sft", "--student", other, "--data", tiny_data, "-o", out, "--max-steps", 40, "optim.lr=1e-2",
                    "optim.warmup_steps=1", "train.batch_size=8", "data.dev_fraction=0", "optim.schedule=constant")
    assert code == 0, log[-2000:]
    step = latest_step_dir(out)
    assert step is not None
    return step


@pytest.fixture(scope="module")
def toks(tiny_dir, other):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "teacher"), AutoTokenizer.from_pretrained(other)


def test_the_two_tokenizers_really_differ(toks) -> None:
    teacher, student = toks
    text = "The answer is 7. Sort these words: apple banana cherry."
    assert teacher(text)["input_ids"] != student(text)["input_ids"] and teacher.get_vocab() != student.get_vocab()


def test_text_round_trip_and_alignment_sum_to_the_teachers_log_prob(toks) -> None:
    teacher, student = toks
    text = "The answer is 12. Sort these words: apple banana."
    ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    st = retokenize.response_text(student, ids, finished=True)
    assert st.problem is None and st.text == text and st.ends[-2] == len(text) and st.ends[-1] == len(text)
    tt = retokenize.scoring_tokens(teacher, st.text, finished=True)
    assert tt.problem is None and tt.ids[-1] == teacher.eos_token_id and tt.ends[-1] == len(text) + 1
    logps = [-(i + 1) / 10 for i in range(len(tt.ids))]
    got = retokenize.assign(st.ends, tt.ends, logps, finished=True)
    assert sum(got) == pytest.approx(sum(logps)) and got[-1] == pytest.approx(logps[-1])
    # every teacher token lands on the student token that covers its last character (worked out here)
    expected = [0.0] * len(st.ends)
    for end, lp in zip(tt.ends[:-1], logps[:-1]):
        expected[next(i for i, e in enumerate(st.ends[:-1]) if e >= end)] += lp
    expected[-1] += logps[-1]
    assert got == pytest.approx(expected)
    # a truncated response: no EOS on either side
    cut = retokenize.response_text(student, ids[:-1], finished=False)
    tt = retokenize.scoring_tokens(teacher, cut.text, finished=False)
    assert teacher.eos_token_id not in tt.ids
    assert sum(retokenize.assign(cut.ends, tt.ends, [-1.0] * len(tt.ids), finished=False)) == -len(tt.ids)


def test_a_byte_token_inside_a_character_covers_nothing_and_the_next_one_covers_it(toks) -> None:
    _, student = toks
    ids = student("é!", add_special_tokens=False)["input_ids"]  # an ASCII-trained byte BPE splits é into bytes
    assert len(ids) >= 3
    st = retokenize.response_text(student, ids, finished=False)
    assert st.problem is None and st.text == "é!"
    assert st.ends[0] == 0 and st.ends[1] == 1 and st.ends[-1] == 2
    half = retokenize.response_text(student, ids[:1], finished=False)  # cut inside the character
    assert half.problem is not None and "UTF-8" in half.problem


def test_text_that_does_not_survive_the_round_trip_is_named(toks, tmp_path) -> None:
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    teacher, student = toks
    ids = student("Hi", add_special_tokens=False)["input_ids"] + [student.convert_tokens_to_ids("<|im_start|>")]
    assert "special token" in (retokenize.response_text(student, ids, finished=False).problem or "")
    make_tokenizer(tmp_path / "lower", vocab_size=300)
    lower = AutoTokenizer.from_pretrained(tmp_path / "lower")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # a tokenizer that normalises its input
    assert "give the text back" in (retokenize.scoring_tokens(lower, "Hello World", finished=True).problem or "")


def test_refusals_name_the_setting(user, tiny_dir, other) -> None:
    base = ["distill", "--teacher", tiny_dir / "teacher", "--student", other, "--data", "train.jsonl", "-o", "runs/x"]
    refused([*base], "tokenizers differ", user)  # without the switch: a mismatch is an error
    refused([*base, "models.cross_tokenizer=true"], "method.teacher_mix", user)
    refused([*base, "models.cross_tokenizer=true", "method.teacher_mix=0"], "method.single_step", user)
    refused([*base, "models.cross_tokenizer=true", "method.name=kd"], "method.name: kd compares", user)
    refused(["teacher-cache", "--teacher", tiny_dir / "teacher", "--student", other, "--data", "train.jsonl",
             "-o", "cache", "models.cross_tokenizer=true"], "models.cross_tokenizer", user)


@pytest.mark.slow
def test_minillm_across_tokenizers_trains_logs_and_resumes_exactly(user, tiny_dir, warm_other) -> None:
    args = ["distill", "--teacher", tiny_dir / "teacher", "--student", warm_other, "--data", "train.jsonl",
            *XTOK, "optim.lr=1e-3", "optim.warmup_steps=1", "train.batch_size=4", "method.num_rollouts=8",
            "method.ppo_epochs=2", "method.max_new_tokens=6", "rollout.batch_size=4", "data.dev_fraction=0",
            "train.save_every=1", "train.keep_last=10", "optim.schedule=constant", "method.xtok_max_mismatch=0.5"]
    code, out = cli(*args, "-o", "runs/a", "--max-steps", 4)
    assert code == 0, out[-3000:]
    assert "cross-tokenizer mode" in out
    records = [json.loads(line) for line in (user / "runs/a/metrics.jsonl").read_text().splitlines()]
    fresh = [r for r in records if "xtok_mismatch" in r]
    assert fresh and all(0.0 <= r["xtok_mismatch"] <= 0.5 for r in fresh)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward"], r["rkl"]])).all() for r in records)
    start = weights(warm_other)
    assert not same_weights(weights(user / "runs/a/step-000004"), start)
    # resume from step 2 (inside a buffer: the saved rows and their teacher scores carry on)
    import shutil

    shutil.copytree(user / "runs/a", user / "runs/b")
    for step in (3, 4):
        shutil.rmtree(user / f"runs/b/step-00000{step}")
    (user / "runs/b/latest").write_text("step-000002\n")
    code, out = cli("distill", "-o", "runs/b", "--resume")
    assert code == 0, out[-3000:]
    assert same_weights(weights(user / "runs/a/step-000004"), weights(user / "runs/b/step-000004"))


@pytest.mark.slow
def test_seqkd_across_tokenizers_trains_on_the_teachers_text(user, tiny_dir, other) -> None:
    code, out = cli("distill", "--teacher", tiny_dir / "teacher", "--student", other, "--data", "train.jsonl", "-o",
                    "runs/s", "--max-steps", 2, "method.name=seqkd", "models.cross_tokenizer=true",
                    "method.max_new_tokens=6", "train.batch_size=4", "data.dev_fraction=0")
    assert code == 0, out[-3000:]
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(other)
    rows = [json.loads(line) for line in (user / "runs/s/seqkd-teacher-responses.jsonl").read_text().splitlines()]
    assert rows and all(max(r["response_ids"], default=0) < len(student) for r in rows)  # the student's ids


@pytest.mark.slow
def test_eval_across_tokenizers_reports_text_level_kl(user, tiny_dir, other) -> None:
    code, out = cli("eval", other, tiny_dir / "student", "--teacher", tiny_dir / "teacher", "--data", "train.jsonl",
                    "--max-samples", 4, "--seeds", "1,2", "--max-new-tokens", 6, "--json", "r.json",
                    "--baseline", tiny_dir / "student")
    assert code == 0, out[-3000:]
    report = json.loads((user / "r.json").read_text())
    rows = {m["name"]: m["metrics"] for m in report["models"]}
    cross, same = rows[str(other)], rows[str(tiny_dir / "student")]
    assert {"rkl_seq_student", "fkl_seq_teacher", "rougeL"} <= set(cross) and "agreement_student" not in cross
    assert {"rkl_student", "agreement_student"} <= set(same) and "rkl_seq_student" not in same
    assert all(v["mean"] is not None for k, v in cross.items() if k.endswith("_seq_student"))


def test_plan_counts_the_teachers_re_tokenised_batch(tiny_dir, other) -> None:
    from minillm_cli.commands.plan import plan_memory
    from minillm_cli.config.loading import load_recipe

    flags = {"models.teacher": str(tiny_dir / "teacher"), "models.student": str(other)}
    xtok = plan_memory(load_recipe(None, XTOK, flags)[0])
    same = plan_memory(load_recipe(None, ["method.teacher_mix=0", "method.single_step=false"], flags)[0])
    assert xtok.part("teacher re-tokenised batch") > 0 and same.part("teacher re-tokenised batch") == 0
    assert xtok.part("rollout buffer") < same.part("rollout buffer")  # no (N, T, V) teacher logits kept
