"""Shared fixtures: a tiny tokenizer, a tiny teacher and a tinier student, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import make_llama, make_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A directory with `tokenizer/`, `teacher/` (4 layers, 64 wide) and `student/` (2 layers, 32 wide)."""
    root = tmp_path_factory.mktemp("tiny")
    make_tokenizer(root / "tokenizer")
    make_llama(root / "teacher", root / "tokenizer", layers=4, hidden=64, seed=1)
    make_llama(root / "student", root / "tokenizer", layers=2, hidden=32, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small alpaca-style jsonl file (train) for end-to-end runs."""
    import json

    root = tmp_path_factory.mktemp("data")
    rows = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."}
        for a in range(6)
        for b in range(4)
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tiny_dir):
    """The tiny student and (frozen) teacher, loaded once per test module."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir / "teacher").requires_grad_(False)
    return student, teacher


@pytest.fixture(scope="module")
def wide_teachers(tiny_dir: Path, tmp_path_factory):
    """A teacher whose head has 8 padding rows, and the same model cut to the shared ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_llama

    n = len(AutoTokenizer.from_pretrained(tiny_dir / "tokenizer"))
    path = tmp_path_factory.mktemp("wide") / "teacher"
    make_llama(path, tiny_dir / "tokenizer", layers=2, hidden=48, seed=5, vocab_size=n + 8)
    wide = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert wide.config.vocab_size == n + 8
    cfg = LlamaConfig(**{**wide.config.to_dict(), "vocab_size": n})
    narrow = LlamaForCausalLM(cfg).eval()
    state = {k: (v[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
             for k, v in wide.state_dict().items()}
    narrow.load_state_dict(state)
    return wide, narrow


@pytest.fixture()
def user(tmp_path, monkeypatch, tiny_dir, tiny_data):
    """A user's working directory holding their own files, with a student and data to train on."""
    import shutil

    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.chdir(root)
    (root / "notes.txt").write_text("my notes")
    shutil.copy(tiny_data, root / "train.jsonl")
    return root
