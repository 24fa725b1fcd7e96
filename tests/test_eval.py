"""`minillm eval` engine: generation, metrics orchestration, reports, CLI errors, dev evaluation."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minillm_cli.cli import app
from minillm_cli.config.schema import EvalConfig
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError
from minillm_cli.evaluate import distribution
from minillm_cli.evaluate.checkpoints import load_checkpoint, resolve_checkpoint
from minillm_cli.evaluate.command import run_eval
from minillm_cli.evaluate.generate import evaluate_during_training, reference_loss
from minillm_cli.models.loading import load_model, load_tokenizer

FAST = dict(seeds="10,20", max_new_tokens=6)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four alpaca rows that also carry a classification label (for calibration)."""
    rows = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}.",
         "label": "yes" if (a + b) % 2 else "no"}
        for a in range(2)
        for b in range(2)
    ]
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(report: dict, name: str) -> dict[str, dict]:
    return next(m["metrics"] for m in report["models"] if m["name"] == name)


def _quiet() -> object:
    from rich.console import Console

    return Console(file=open("/dev/null", "w"), width=200)


# ---------------------------------------------------------------------------------- pure math
def test_kl_and_agreement_match_hand_computation() -> None:
    from minillm_cli.losses.divergences import forward_kl, reverse_kl  # what distribution.divergences uses

    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    # Teacher head one row wider; the padding row must be sliced away before normalising.
    t_logits = torch.cat([p.log(), torch.tensor([5.0])]).view(1, 1, 3)
    s_logits = q.log().view(1, 1, 2)
    mask = torch.ones(1, 1)
    assert forward_kl(s_logits, t_logits, mask).item() == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    assert reverse_kl(s_logits, t_logits, mask).item() == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    # argmax q = id 1; the sliced teacher ties -> id 0 (the wide row 2 would win if not sliced)
    assert distribution.top1_agreement(s_logits, t_logits, mask).item() == 0.0
    t_logits[0, 0, 1] += 1.0
    assert distribution.top1_agreement(s_logits, t_logits, mask).item() == 1.0
    assert distribution.top1_agreement(s_logits, t_logits, torch.zeros(1, 1)).item() == 0.0


def test_divergences_chunking_and_self(tiny_dir: Path) -> None:
    cpu = torch.device("cpu")
    student = load_model(tiny_dir / "student", dtype=torch.float32, device=cpu)
    teacher = load_model(tiny_dir / "teacher", dtype=torch.float32, device=cpu)
    prompt = torch.tensor([[2, 2, 5, 6], [7, 8, 9, 10]])  # left-padded
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    resp = torch.tensor([[11, 12, 13, 2], [14, 15, 2, 2]])
    resp_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    whole = distribution.divergences(student, teacher, prompt, prompt_mask, resp, resp_mask)
    chunked = distribution.divergences(student, teacher, prompt, prompt_mask, resp, resp_mask, chunk_size=3)
    for name in ("fkl", "rkl", "agree"):
        assert torch.allclose(whole[name], chunked[name])
    assert (whole["fkl"][resp_mask.bool()] > 0).all() and whole["fkl"][1, 3] == 0
    self_div = distribution.divergences(teacher, teacher, prompt, prompt_mask, resp, resp_mask)
    assert self_div["fkl"].abs().max() < 1e-5 and torch.equal(self_div["agree"], resp_mask.float())


# --------------------------------------------------------------------------------- end to end
def test_end_to_end_student_and_teacher_all_metrics(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    out, samples, plot = tmp_path / "r.json", tmp_path / "s.jsonl", tmp_path / "eb.png"
    code = run_eval(
        models=[str(tiny_dir / "student")], data=str(eval_file), teacher=str(tiny_dir / "teacher"),
        metrics="rougeL,em,loss,kl,agreement,exposure_bias,dist4,calibration", label_words="yes,no",
        json_out=str(out), samples_out=str(samples), plot_out=str(plot), console=_quiet(), **FAST,
    )
    assert code == 0
    report = json.loads(out.read_text())
    s = report["settings"]
    assert report["split"] == "test" and s["split"] == "test"
    assert s["seeds"] == [10, 20]
    assert s["decoding"] == {**s["decoding"], "greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                             "no_repeat_ngram_size": 6, "max_prompt_tokens": 256, "max_new_tokens": 6}
    assert s["data"]["sha256"] == hashlib.sha256(eval_file.read_bytes()).hexdigest()
    assert s["data"]["examples"] == 4
    assert [m["name"] for m in report["models"]] == [f"{tiny_dir / 'teacher'} (teacher)", str(tiny_dir / "student")]

    student = _metrics(report, str(tiny_dir / "student"))
    teacher = _metrics(report, f"{tiny_dir / 'teacher'} (teacher)")
    kl_cols = ["fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher"]
    exa = [k for k in student if k.startswith("exaccerr@")]
    assert set(student) == {"rougeL", "em", "dist4", "loss", *kl_cols, "agreement_student", "agreement_teacher",
                            "ece", "accuracy", *exa} and len(exa) == 1
    assert not set(teacher) & {*kl_cols, "agreement_student", *exa}  # teacher-vs-teacher metrics are not shown
    for col in kl_cols:  # two different random models: strictly positive divergence, std over 2 seeds
        assert student[col]["mean"] > 0 and student[col]["std"] is not None
    assert 0 <= student["agreement_student"]["mean"] <= 100
    assert 0 <= student["rougeL"]["mean"] <= 100 and student["rougeL"]["std"] is not None
    assert student["loss"]["mean"] > 0 and student["loss"]["std"] is None  # deterministic: no std
    assert 0 <= student["ece"]["mean"] <= 1 and student["accuracy"]["mean"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    curve = next(m for m in report["models"] if m["name"] == str(tiny_dir / "student"))["curves"]["exposure_bias"]
    assert curve["lengths"][0] == 1 and len(curve["R"]) == len(curve["E"]) == len(curve["exaccerr"])
    assert int(exa[0].split("@")[1]) == s["exposure_bias"]["length"]

    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 4  # models x seeds x prompts
    assert set(lines[0]) == {"model", "seed", "index", "prompt", "response", "references"}
    assert lines[0]["references"] == ["The answer is 0."] and "What is 0 plus 0?" in lines[0]["prompt"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    teacher = str(tiny_dir / "teacher")
    code = run_eval(models=[teacher], data=str(eval_file), teacher=teacher, metrics="kl,agreement",
                    json_out=str(out), console=_quiet(), seeds="10", max_new_tokens=6)
    assert code == 0
    row = _metrics(json.loads(out.read_text()), teacher)
    for col in ("fkl_student", "rkl_student", "fkl_teacher", "rkl_teacher"):
        assert abs(row[col]["mean"]) < 1e-5
    assert row["agreement_student"]["mean"] == 100.0 and row["agreement_teacher"]["mean"] == 100.0


def test_same_seed_reproduces_and_another_seed_differs(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    def once(seeds: str, tag: str) -> tuple[dict, list[str]]:
        out, samples = tmp_path / f"{tag}.json", tmp_path / f"{tag}.jsonl"
        run_eval(models=[str(tiny_dir / "student")], data=str(eval_file), metrics="rougeL,dist4", seeds=seeds,
                 max_new_tokens=6, json_out=str(out), samples_out=str(samples), console=_quiet())
        texts = [json.loads(line)["response"] for line in samples.read_text().splitlines()]
        return json.loads(out.read_text())["models"][0]["metrics"], texts

    first, texts_a = once("10", "a")
    second, texts_b = once("10", "b")
    _, texts_c = once("11", "c")
    assert first == second and texts_a == texts_b
    assert texts_a != texts_c


def test_greedy_is_one_argmax_pass(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    out, samples = tmp_path / "g.json", tmp_path / "g.jsonl"
    code = run_eval(models=[str(tiny_dir / "student")], data=str(eval_file), metrics="rougeL", greedy=True,
                    max_new_tokens=3, json_out=str(out), samples_out=str(samples), console=_quiet())
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["seeds"] is None and report["settings"]["decoding"]["greedy"] is True
    assert report["models"][0]["metrics"]["rougeL"]["std"] is None
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 4 and all(line["seed"] is None for line in lines)

    # The first generated token of each prompt is the argmax of the model's next-token logits.
    tok = load_tokenizer(tiny_dir / "student")
    model = load_model(tiny_dir / "student", dtype=torch.float32, device=torch.device("cpu"))
    for line in lines:
        ids = tok(line["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            first = int(model(input_ids=ids).logits[0, -1].argmax())
        expect = tok.decode([first], skip_special_tokens=True).strip()
        assert line["response"].startswith(expect)


def test_fail_under_gates(tiny_dir: Path, eval_file: Path) -> None:
    kw = dict(models=[str(tiny_dir / "student")], data=str(eval_file), metrics="rougeL", seeds="10",
              max_new_tokens=3, max_samples=2, console=_quiet())
    assert run_eval(fail_under=["rougeL=101"], **kw) == 1
    assert run_eval(fail_under=["rougeL=0"], **kw) == 0


def test_baseline_paired_comparison_end_to_end(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    # The student is evaluated as a model AND as the teacher: the two rows see the same prompts and
    # seeds, so they generate the same text and their paired differences are exactly 0.
    student, teacher = str(tiny_dir / "student"), str(tiny_dir / "teacher")
    out = tmp_path / "r.json"
    kw = dict(data=str(eval_file), metrics="rougeL,loss,dist4", console=_quiet(), **FAST)
    code = run_eval(models=[student, teacher], baseline=student, json_out=str(out), teacher=student,
                    fail_under=["rougeL@baseline=-100"], **kw)
    assert code == 0
    report = json.loads(out.read_text())
    c = report["comparison"]
    assert c["baseline"] == student and set(c["models"]) == {f"{student} (teacher)", teacher}
    same = c["models"][f"{student} (teacher)"]
    assert set(same) == {"rougeL", "loss"}  # dist4 is not a mean over prompts: no interval
    for d in same.values():
        assert (d["diff"], d["low"], d["high"], d["within_noise"], d["prompts"]) == (0.0, 0.0, 0.0, True, 4)
    other = c["models"][teacher]
    means = {m["name"]: m["metrics"] for m in report["models"]}
    for metric, d in other.items():  # the difference of the reported means, inside its interval
        assert d["diff"] == pytest.approx(means[teacher][metric]["mean"] - means[student][metric]["mean"])
        assert d["low"] <= d["diff"] <= d["high"]
    # gates on the difference: the identical row is not better than the baseline by 0.01
    assert run_eval(models=[student], baseline=student, teacher=student, fail_under=["rougeL@baseline=0"], **kw) == 0
    assert run_eval(models=[student], baseline=student, teacher=student,
                    fail_under=["rougeL@baseline=0.01"], **kw) == 1
    with pytest.raises(UserError, match="not one of the evaluated models"):
        run_eval(models=[student], baseline="nope", **kw)
    with pytest.raises(UserError, match="needs --baseline"):
        run_eval(models=[student], fail_under=["rougeL@baseline=0"], **kw)
    with pytest.raises(UserError, match="dist4 is not a mean over prompts"):
        run_eval(models=[student, teacher], baseline=student, fail_under=["dist4@baseline=0"], **kw)


def test_several_baselines_from_one_evaluation(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    # baseline as a list: one comparison per baseline from the same generations; the first is the
    # report's "comparison" (as with one --baseline), "comparisons" holds every one.
    student, teacher = str(tiny_dir / "student"), str(tiny_dir / "teacher")
    out = tmp_path / "r.json"
    kw = dict(data=str(eval_file), metrics="rougeL,kl", console=_quiet(), **FAST)
    assert run_eval(models=[student, teacher], baseline=[student, teacher], json_out=str(out), teacher=student,
                    row_metrics={student: ["rougeL"]}, fail_under=["rougeL@baseline=-100"], **kw) == 0
    report = json.loads(out.read_text())
    assert report["comparison"]["baseline"] == student
    assert set(report["comparisons"]) == {student, teacher}
    assert report["comparisons"][student] == report["comparison"]
    vs_teacher = report["comparisons"][teacher]["models"]
    assert set(vs_teacher) == {f"{student} (teacher)", student}
    assert vs_teacher[student]["rougeL"]["diff"] == pytest.approx(-report["comparison"]["models"][teacher]["rougeL"]["diff"])
    # row_metrics: the student row got rougeL only, the other student row the teacher divergences too
    assert set(_metrics(report, student)) == {"rougeL"}
    assert "rkl_student" in _metrics(report, teacher)
    from minillm_cli.evaluate import report_json

    back = report_json.from_json(report)  # the extra comparisons survive a round trip
    assert [c.baseline for c in back.more_comparisons] == [teacher]
    with pytest.raises(UserError, match="not one of the evaluated models"):
        run_eval(models=[student], baseline=[student, "nope"], teacher=student, **kw)
    with pytest.raises(UserError, match="row_metrics"):  # not one of the metrics asked for
        run_eval(models=[student], row_metrics={student: ["loss"]}, teacher=student, **kw)


def test_reference_loss_is_mean_of_per_sample_token_means(tiny_dir: Path, eval_file: Path) -> None:
    tok = load_tokenizer(tiny_dir / "student")
    model = load_model(tiny_dir / "student", dtype=torch.float32, device=torch.device("cpu"))
    examples = data_mod.load_examples(str(eval_file))
    encoded, _ = data_mod.encode_examples(examples, tok, template="chat", max_prompt_tokens=256, max_total_tokens=512)
    encoded[0].response_ids = encoded[0].response_ids[:2]  # unequal lengths: per-sample mean != token mean
    got = reference_loss(model, encoded, pad_id=tok.pad_token_id, batch_size=3, device=torch.device("cpu"))
    with torch.no_grad():  # HF's own loss, one example at a time (its token mean over the response)
        want = [float(model(**data_mod.collate_sft([e], tok.pad_token_id)).loss) for e in encoded]
    assert got == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_lora_step_in_run_dir_loads_on_its_base(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir = tiny_dir / "student"
    base = load_model(base_dir, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    step = run / "step-000003"
    peft_model.save_pretrained(step)
    load_tokenizer(base_dir).save_pretrained(step)
    (step / "meta.json").write_text(json.dumps({"step": 3, "lora": True, "base_model": str(base_dir)}))
    (run / "latest").write_text("step-000003\n")

    spec = resolve_checkpoint(str(run))
    assert spec.path == step and spec.base == base_dir and spec.name == str(run)
    model, _ = load_checkpoint(spec, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        plain = load_model(base_dir, dtype=torch.float32, device=torch.device("cpu"))(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter did change the model

    # The training loop evaluates the peft-wrapped model as is.
    tok = load_tokenizer(base_dir)
    dev = [data_mod.Encoded(prompt_ids=[5, 6, 7], response_ids=[8, 9, tok.eos_token_id], index=0)]
    cfg = EvalConfig(seeds=[1], max_new_tokens=3)
    dev_metrics = evaluate_during_training(peft_model, tok, dev, cfg, torch.device("cpu"))
    assert set(dev_metrics) == {"dev/rougeL", "dev/loss"}


# ---------------------------------------------------------------------------------- bad input
def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", ["unknown_metric", "empty", "no_reference", "not_a_model", "bad_baseline"])
def test_cli_bad_input_exits_2_with_one_line(case: str, tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    model, data, extra = str(tiny_dir / "student"), str(eval_file), []
    if case == "unknown_metric":
        extra, expect = ["--metrics", "rougeL,bleu"], "unknown metric 'bleu'"
    elif case == "empty":
        data, expect = str(tmp_path / "empty.jsonl"), "empty"
        Path(data).write_text("")
    elif case == "bad_baseline":
        extra, expect = ["--baseline", "sft-run"], "--baseline 'sft-run': not one of the evaluated models"
    elif case == "no_reference":
        data, expect = str(tmp_path / "noref.jsonl"), "missing reference column 'output'"
        Path(data).write_text(json.dumps({"instruction": "Say hi."}) + "\n")
    else:
        model, expect = str(tmp_path / "junk"), "not a model"
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("hello")
    code, err = _cli([model, "--data", data, *extra])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0]
    if case == "unknown_metric":
        assert "rougeL" in lines[0] and "calibration" in lines[0]  # the known ones are listed
    if case in ("empty", "no_reference"):
        assert data in lines[0]


def test_calibration_on_prompt_label_rows(tiny_dir: Path, tmp_path: Path) -> None:
    words = ["yes", "no", "maybe"]
    rows = [{"prompt": "Is it? " * n, "label": words[n % 3]} for n in range(1, 7)]  # prompts of 6 lengths
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cal.json"
    code = run_eval(models=[str(tiny_dir / "student")], data=str(data), metrics="calibration",
                    label_words=",".join(words), batch_size=4, json_out=str(out), console=_quiet())
    assert code == 0
    got = json.loads(out.read_text())["models"][0]["metrics"]
    assert set(got) == {"ece", "accuracy"}

    # The same numbers from unpadded single-prompt forwards (checks left padding and the restricted softmax).
    tok = load_tokenizer(tiny_dir / "student")
    model = load_model(tiny_dir / "student", dtype=torch.float32, device=torch.device("cpu"))
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    conf, pred = [], []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1, label_ids].softmax(-1)
        conf.append(float(probs.max()))
        pred.append(words[int(probs.argmax())])
    from minillm_cli.evaluate.metrics import accuracy, expected_calibration_error

    labels = [r["label"] for r in rows]
    assert got["accuracy"]["mean"] == pytest.approx(accuracy(pred, labels))
    assert got["ece"]["mean"] == pytest.approx(expected_calibration_error(conf, pred, labels), abs=1e-5)


def test_calibration_label_errors(tiny_dir: Path, eval_file: Path) -> None:
    kw = dict(models=[str(tiny_dir / "student")], data=str(eval_file), metrics="calibration", console=_quiet())
    with pytest.raises(UserError, match="label 'yes' is not one of --label-words no,maybe"):
        run_eval(label_words="no,maybe", **kw)
    with pytest.raises(UserError, match="needs at least two"):
        run_eval(**kw)
    with pytest.raises(UserError, match="needs a teacher|pass --teacher"):
        run_eval(models=[str(tiny_dir / "student")], data=str(eval_file), metrics="kl", console=_quiet())


# ------------------------------------------------------------------------------ during training
def test_evaluate_during_training_returns_dev_keys(tiny_dir: Path, eval_file: Path) -> None:
    tok = load_tokenizer(tiny_dir / "student")
    model = load_model(tiny_dir / "student", dtype=torch.float32, device=torch.device("cpu")).train()
    examples = data_mod.load_examples(str(eval_file))
    dev, _ = data_mod.encode_examples(examples, tok, template="chat", max_prompt_tokens=64, max_total_tokens=96)
    cfg = EvalConfig(metrics=["rougeL", "loss"], seeds=[10], max_new_tokens=4)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = evaluate_during_training(model, tok, dev, cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's RNG is untouched
    assert model.training  # mode restored
    assert set(first) == {"dev/rougeL", "dev/loss"}
    assert 0 <= first["dev/rougeL"] <= 100 and first["dev/loss"] > 0
    assert evaluate_during_training(model, tok, dev, cfg, torch.device("cpu")) == first  # seeded
    assert evaluate_during_training(model, tok, [], cfg, torch.device("cpu")) == {}


def test_teacher_logits_kept_across_students_change_no_number(tiny_dir: Path, eval_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher's logits of its own continuations are computed once and reused for every student
    (scoring.TEACHER_CACHE_BYTES); the report is the same as with a fresh teacher forward per student."""
    from minillm_cli.evaluate import distribution, scoring

    forwards: list[int] = []
    real = distribution.teacher_forward
    monkeypatch.setattr(distribution, "teacher_forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    students = [str(tiny_dir / "student"), str(tiny_dir / "teacher")]
    reports = []
    for budget in (scoring.TEACHER_CACHE_BYTES, 0):
        monkeypatch.setattr(scoring, "TEACHER_CACHE_BYTES", budget)
        out = tmp_path / f"r{budget}.json"
        forwards.clear()
        assert run_eval(models=students, data=str(eval_file), teacher=str(tiny_dir / "teacher"), metrics="kl",
                        json_out=str(out), console=_quiet(), **FAST) == 0
        reports.append((json.loads(out.read_text())["models"], len(forwards)))
    (cached, n_cached), (fresh, n_fresh) = reports
    assert cached == fresh
    # per seed (4 prompts fit one default batch): the teacher's own continuations are scored by the
    # teacher once, not once per student; each student's continuations need their own teacher forward
    seeds = 2
    assert n_cached == seeds * (1 + len(students)) and n_fresh == seeds * 2 * len(students)


def test_length_and_eos_calibration_metrics(tiny_dir: Path, eval_file: Path, tmp_path: Path) -> None:
    """`length` (tokens before EOS, share that stopped) and `eos` (q(EOS) − p(EOS) on the model's own
    samples, per-position curves): the teacher scored against itself has a gap of exactly 0."""
    from minillm_cli.evaluate.command import run_eval

    out = tmp_path / "r.json"
    teacher = str(tiny_dir / "teacher")
    assert run_eval(models=[str(tiny_dir / "student"), teacher], data=str(eval_file), teacher=teacher,
                    metrics="length,eos", json_out=str(out), console=_quiet(), **FAST) == 0
    rows = {m["name"]: m for m in json.loads(out.read_text())["models"]}
    student, itself = rows[str(tiny_dir / "student")], rows[teacher]
    for row in (student, itself):
        assert 0 <= row["metrics"]["stopped"]["mean"] <= 100
        assert 0 <= row["metrics"]["length"]["mean"] <= FAST["max_new_tokens"]
        curve = row["curves"]["eos"]
        assert len(curve["q_eos"]) == len(curve["p_eos"]) == len(curve["stopped_q"]) <= FAST["max_new_tokens"]
        assert all(0 <= v <= 1 for v in curve["stopped_q"] + curve["stopped_p"])
        assert curve["stopped_q"] == sorted(curve["stopped_q"])  # the probability of having stopped only grows
        assert row["curves"]["length"]["p10"] <= row["curves"]["length"]["p90"]
    assert itself["metrics"]["eos_gap"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert itself["curves"]["eos"]["q_eos"] == pytest.approx(itself["curves"]["eos"]["p_eos"], abs=1e-6)
    assert student["metrics"]["eos_gap"]["mean"] != pytest.approx(0.0, abs=1e-6)
