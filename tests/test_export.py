"""Tests of `minillm export`: HF dirs (sharded, dtype), LoRA merge, GGUF round trips, safety, step choice, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minillm_cli import __version__
from minillm_cli.errors import UserError
from minillm_cli.export import ExportOptions, export
from minillm_cli.export import gguf as gguf_export
from minillm_cli.export import verify as verify_mod
from minillm_cli.runs.steps import pick_step

DATA_SHA = "ab" * 32
METHOD = {"name": "minillm", "teacher_mix": 0.2, "clip_eps": 0.2, "length_norm": True}


def _write_step(run: Path, step: int, teacher: Path, extra_meta: dict | None = None) -> Path:
    """Write meta.json and recipe.yaml into run/step-NNNNNN (whose weights the caller put there)."""
    import yaml

    step_dir = run / f"step-{step:06d}"
    recipe = {"models": {"teacher": str(teacher)}, "data": {"path": "data/train.jsonl"}, "method": METHOD}
    (step_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    meta = {
        "step": step,
        "method": "minillm",
        "teacher": str(teacher),
        "student": None,
        "student_init": {"from": "teacher", "keep": 2},
        "data": {"path": "data/train.jsonl", "sha256": DATA_SHA},
        "dev_metrics": {},
        "lora": False,
        "base_model": None,
        "minillm_version": __version__,
        **(extra_meta or {}),
    }
    (step_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return step_dir


def _make_run(root: Path, model_dir: Path, teacher: Path, steps: tuple[int, ...] = (1, 2)) -> Path:
    """A run dir with a full-weights copy of `model_dir` per step, `latest`, and dev evals in metrics.jsonl."""
    run = root / "run"
    run.mkdir(parents=True)
    for step in steps:
        shutil.copytree(model_dir, run / f"step-{step:06d}")
        _write_step(run, step, teacher)
    (run / "latest").write_text(f"step-{steps[-1]:06d}\n")
    rows = [
        {"step": 1, "loss": 3.0},
        {"step": 1, "dev/rougeL": 0.40, "dev/loss": 2.5},
        {"step": 2, "loss": 2.0},
        {"step": 2, "dev/rougeL": 0.30, "dev/loss": 2.1},
        {"step": 3, "dev/rougeL": 0.99, "dev/loss": 0.1},  # a step whose dir was never completed
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture(scope="module")
def run_dir(tiny_dir: Path, tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("export"), tiny_dir / "student", tiny_dir / "teacher")


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Sort these words: apple banana cherry. 12 + 3 = ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _hf_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _logits(model, AutoTokenizer.from_pretrained(model_dir))


# ------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip_identical_logits(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = export(run_dir, ExportOptions(out=out))
    assert result.step_dir == run_dir / "step-000002"
    assert result.max_abs_logit_diff <= 1e-6
    assert result.tolerance == pytest.approx(verify_mod.SAME_DTYPE_ABS_TOL)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md", "recipe.yaml"):
        assert name in result.files and (out / name).is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "optimizer.safetensors").exists()  # resume state is not part of an export
    # an independent reload agrees exactly with the source step
    assert torch.equal(_hf_logits(out), _hf_logits(result.step_dir))
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp dir left behind


def test_sharded_export_has_index_and_loads(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    result = export(run_dir, ExportOptions(out=out, shard_size="50KB"))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all((out / s).stat().st_size <= 50_000 + 50_000 for s in shards)  # one tensor may exceed the cap
    assert result.max_abs_logit_diff <= 1e-6
    assert torch.equal(_hf_logits(out), _hf_logits(result.step_dir))


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_conversion_within_tolerance(run_dir: Path, tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    from safetensors import safe_open

    out = tmp_path / dtype
    result = export(run_dir, ExportOptions(out=out, dtype=dtype))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch_dtype}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
    source = _hf_logits(result.step_dir)
    rel = verify_mod.DTYPE_REL_TOL[dtype]
    assert 0 < result.max_abs_logit_diff <= result.tolerance
    assert result.tolerance == pytest.approx(1e-6 + rel * float(source.abs().max()), rel=0.5)
    assert torch.allclose(_hf_logits(out), source, atol=result.tolerance, rtol=0)


def test_invalid_options_are_user_errors(run_dir: Path, tmp_path: Path) -> None:
    for opts, culprit in [
        (ExportOptions(out=tmp_path / "a", dtype="int8"), "--dtype"),
        (ExportOptions(out=tmp_path / "a", shard_size="lots"), "--shard-size"),
        (ExportOptions(out=tmp_path / "a", format="onnx"), "--format"),
        (ExportOptions(out=tmp_path / "a", format="gguf", gguf_type="q4_k"), "--gguf-type"),
        (ExportOptions(out=run_dir), "contains the step"),
    ]:
        with pytest.raises(UserError, match=culprit):
            export(run_dir, opts)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_run(tiny_dir: Path, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A run whose step dir holds a peft LoRA adapter (random non-zero B) over the tiny student."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_dir / "student"
    run = tmp_path_factory.mktemp("lora") / "run"
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # peft starts B at zero, which would make the adapter a no-op
    model.eval()
    step_dir = run / "step-000004"
    model.save_pretrained(step_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.save_pretrained(step_dir)
    _write_step(run, 4, tiny_dir / "teacher", {"lora": True, "base_model": str(base_dir)})
    (run / "latest").write_text("step-000004\n")
    return run, _logits(model, tokenizer)


def test_lora_merge_matches_adapter_outputs(lora_run: tuple[Path, torch.Tensor], tiny_dir: Path, tmp_path: Path) -> None:
    run, adapter_logits = lora_run
    out = tmp_path / "merged"
    result = export(run, ExportOptions(out=out))
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged = _hf_logits(out)
    base = _hf_logits(tiny_dir / "student")
    assert (adapter_logits - base).abs().max() > 1e-2  # the adapter really changes the model
    assert torch.allclose(merged, adapter_logits, atol=1e-4 * float(adapter_logits.abs().max()) + 1e-6, rtol=0)
    assert result.max_abs_logit_diff <= result.tolerance
    assert "LoRA merged" in (out / "README.md").read_text()


def test_lora_without_merge_copies_adapter(lora_run: tuple[Path, torch.Tensor], tiny_dir: Path, tmp_path: Path) -> None:
    run, _ = lora_run
    out = tmp_path / "adapter"
    result = export(run, ExportOptions(out=out, merge_lora=False))
    assert (out / "adapter_model.safetensors").read_bytes() == (run / "step-000004" / "adapter_model.safetensors").read_bytes()
    assert not (out / "model.safetensors").exists()
    assert result.max_abs_logit_diff <= 1e-6
    assert str(tiny_dir / "student") in (out / "README.md").read_text()  # the note of the base model
    with pytest.raises(UserError, match="--no-merge"):
        export(run, ExportOptions(out=tmp_path / "x", merge_lora=False, dtype="fp16"))


def test_lora_missing_base_is_user_error(lora_run: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    run, _ = lora_run
    step = tmp_path / "step-000004"
    shutil.copytree(run / "step-000004", step)
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="base_model"):
        export(step, ExportOptions(out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- GGUF
def _gguf_logits(out: Path, name: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    return _logits(model, AutoTokenizer.from_pretrained(out, gguf_file=name))


def test_gguf_f32_round_trip_through_transformers(run_dir: Path, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "gguf"
    result = export(run_dir, ExportOptions(out=out, format="gguf", gguf_type="f32"))
    assert sorted(result.files) == ["README.md", "model-f32.gguf"]
    reader = gguf.GGUFReader(out / "model-f32.gguf")
    fields = reader.fields

    def value(key: str):
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2 and value("llama.embedding_length") == 32
    assert value("llama.attention.head_count") == 4 and value("llama.attention.head_count_kv") == 4
    assert value("tokenizer.ggml.model") == "gpt2"
    source_tok = AutoTokenizer.from_pretrained(result.step_dir)
    assert value("tokenizer.ggml.eos_token_id") == source_tok.eos_token_id
    assert value("tokenizer.chat_template") == source_tok.chat_template
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    # q rows are stored in llama.cpp's interleaved order, not HF's
    from safetensors import safe_open

    with safe_open(str(result.step_dir / "model.safetensors"), "pt") as f:
        hf_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
    stored_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    assert stored_q.shape == hf_q.shape and not (stored_q == hf_q).all()
    assert (stored_q == gguf_export._permute_qk(hf_q, 4)).all()
    # transformers' GGUF loader gives back the source model
    assert result.max_abs_logit_diff <= result.tolerance
    assert torch.allclose(_gguf_logits(out, "model-f32.gguf"), _hf_logits(result.step_dir), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gguf_type,ggml_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_f16_q8_within_tolerance(run_dir: Path, tmp_path: Path, gguf_type: str, ggml_type: str) -> None:
    import gguf

    out = tmp_path / gguf_type
    name = f"model-{gguf_type}.gguf"
    result = export(run_dir, ExportOptions(out=out, format="gguf", gguf_type=gguf_type))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / name).tensors}
    assert types["blk.0.attn_q.weight"] == ggml_type and types["token_embd.weight"] == ggml_type
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as in llama.cpp
    assert 0 < result.max_abs_logit_diff <= result.tolerance
    source = _hf_logits(result.step_dir)
    assert result.tolerance == pytest.approx(1e-6 + verify_mod.GGUF_REL_TOL[gguf_type] * float(source.abs().max()), rel=0.5)
    assert torch.allclose(_gguf_logits(out, name), source, atol=result.tolerance, rtol=0)


def test_gguf_tied_gqa_padded_vocab(tiny_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-like student: tied embeddings, fewer kv heads than q heads, embedding rows past the tokenizer."""
    import gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    cfg = LlamaConfig(vocab_size=len(tok) + 16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(5)
    model_dir = tmp_path / "smol"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = _make_run(tmp_path, model_dir, tiny_dir / "teacher", steps=(1,))
    out = tmp_path / "out"
    result = export(run, ExportOptions(out=out, format="gguf", gguf_type="f32"))
    reader = gguf.GGUFReader(out / "model-f32.gguf")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tok) + 16 and tokens[-1] == f"[PAD{len(tok) + 15}]"
    assert result.max_abs_logit_diff <= result.tolerance
    assert torch.allclose(_gguf_logits(out, "model-f32.gguf"), _hf_logits(model_dir), atol=1e-5, rtol=0)


def test_gguf_refuses_non_llama(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    model_dir = tmp_path / "qwen"
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = _make_run(tmp_path, model_dir, tiny_dir / "teacher", steps=(1,))
    with pytest.raises(UserError, match="qwen2"):
        export(run, ExportOptions(out=tmp_path / "out", format="gguf"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- safety
def test_refuses_non_empty_out_and_leaves_it_untouched(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite") as err:
        export(run_dir, ExportOptions(out=out))
    assert str(out) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # --overwrite replaces only an earlier minillm export, never a directory of the user's
    with pytest.raises(UserError, match="not an earlier minillm export .*keep.txt"):
        export(run_dir, ExportOptions(out=out, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    other = tmp_path / "other"
    export(run_dir, ExportOptions(out=other))
    (other / "stale.txt").write_text("from the earlier export")
    export(run_dir, ExportOptions(out=other, overwrite=True))
    assert not (other / "stale.txt").exists() and (other / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # the old copy was deleted


def test_failed_verification_leaves_nothing(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify_mod.DTYPE_REL_TOL, "bf16", 0.0)  # bf16 rounding now counts as a failure
    out = tmp_path / "out"
    with pytest.raises(UserError, match="differs from the source"):
        export(run_dir, ExportOptions(out=out, dtype="bf16"))
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_keeps_previous_export(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    export(run_dir, ExportOptions(out=out))
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setitem(verify_mod.GGUF_REL_TOL, "q8_0", 0.0)
    with pytest.raises(UserError, match="differs from the source"):
        export(run_dir, ExportOptions(out=out, format="gguf", gguf_type="q8_0", overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ step choice
def test_pick_step(run_dir: Path) -> None:
    assert pick_step(run_dir, "latest") == run_dir / "step-000002"
    assert pick_step(run_dir, "1") == run_dir / "step-000001"
    assert pick_step(run_dir, "best:dev/rougeL") == run_dir / "step-000001"  # higher is better; step 3 has no dir
    assert pick_step(run_dir, "best:dev/loss") == run_dir / "step-000002"  # lower is better
    assert pick_step(run_dir / "step-000001", "latest") == run_dir / "step-000001"  # a step dir is used as is
    with pytest.raises(UserError, match="dev/bleu"):
        pick_step(run_dir, "best:dev/bleu")
    with pytest.raises(UserError, match="no complete step 7"):
        pick_step(run_dir, "7")
    with pytest.raises(UserError, match="--step"):
        pick_step(run_dir, "newest")


def test_best_step_from_meta_when_metrics_missing(tiny_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, acc in [(5, 0.7), (6, 0.2)]:
        (run / f"step-{step:06d}").mkdir(parents=True)
        _write_step(run, step, tiny_dir / "teacher", {"dev_metrics": {"dev/acc": acc}})
    assert pick_step(run, "best:dev/acc") == run / "step-000005"


def test_run_without_complete_step_is_user_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "step-000001").mkdir(parents=True)  # no meta.json: incomplete
    (run / ".tmp-step-000002-123").mkdir()
    with pytest.raises(UserError, match="no complete step"):
        export(run, ExportOptions(out=tmp_path / "out"))
    with pytest.raises(UserError, match="no such"):
        pick_step(tmp_path / "missing", "latest")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- model card
def test_model_card_records_provenance(run_dir: Path, tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "card"
    export(run_dir, ExportOptions(out=out, step="1", verify=False))
    card = (out / "README.md").read_text()
    assert str(tiny_dir / "teacher") in card
    assert "| Method | minillm |" in card and "teacher_mix: 0.2" in card and "clip_eps: 0.2" in card
    assert DATA_SHA in card and "data/train.jsonl" in card
    assert "| Steps | 1 |" in card
    assert "| dev/rougeL | 0.4 |" in card and "| dev/loss | 2.5 |" in card  # step 1's eval, not step 2's
    assert __version__ in card and "safetensors (fp32)" in card
    assert '"keep": 2' in card  # student init
