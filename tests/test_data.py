"""Data pipeline (`rows`, `data`): formats, templates, masking, length rule, malformed rows."""

from __future__ import annotations

import json

import pytest

from minillm_cli.config.schema import DataConfig
from minillm_cli.data import encoding as data
from minillm_cli.data import rows as rows_mod
from minillm_cli.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "Add 1 and 2.", "input": "", "output": "3"}, "alpaca"),
        ({"instruction": "Add.", "context": "1 and 2", "response": "3"}, "dolly"),
        ({"prompt": "Add 1 and 2.", "response": "3"}, "prompt_response"),
        ({"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}]}, "messages"),
    ],
)
def test_formats_detected(tmp_path, row, fmt):
    path = _write(tmp_path / "d.jsonl", [row])
    assert rows_mod.detect_format(row, "x") == fmt
    ex = rows_mod.load_examples(str(path))[0]
    assert ex.response == "3"
    assert ex.messages[-1]["role"] == "user"


def test_csv_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        assert rows_mod.load_examples(str(tmp_path / name))[0].response == "hi"


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        rows_mod.load_examples(str(path))


def test_missing_column_names_row(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(UserError, match=r"d.jsonl:2: missing column 'output'"):
        rows_mod.load_examples(str(path))


def test_unknown_columns_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="cannot detect the data format"):
        rows_mod.load_examples(str(_write(tmp_path / "a.jsonl", [{"foo": 1}])))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        rows_mod.load_examples(str(tmp_path / "e.jsonl"))
    with pytest.raises(UserError, match="not found"):
        rows_mod.load_examples(str(tmp_path / "missing.jsonl"))


def test_prompt_masked_and_eos_trained(tok):
    ex = rows_mod.Example(messages=[{"role": "user", "content": "What is 2 plus 3?"}], response="5", instruction="What is 2 plus 3?")
    enc, stats = data.encode_examples([ex], tok, template="chat", max_prompt_tokens=256, max_total_tokens=512)
    e = enc[0]
    assert e.response_ids[-1] == tok.eos_token_id
    assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n")
    sft = data.collate_sft(enc, tok.pad_token_id)
    labels = sft["labels"][0]
    n_prompt = len(e.prompt_ids)
    assert (labels[:n_prompt] == -100).all()
    assert labels[n_prompt:].tolist() == e.response_ids
    pairs = data.collate_pairs(enc, tok.pad_token_id)
    assert pairs["response_ids"][0].tolist() == e.response_ids and pairs["response_mask"].all()


def test_instruction_template(tok):
    ex = rows_mod.Example(messages=[{"role": "user", "content": "Q\n\nctx"}], response="A", instruction="Q", input="ctx")
    text = data.render_prompt(ex, tok, "instruction")
    assert "### Instruction:\nQ" in text and "### Input:\nctx" in text and text.endswith("### Response:\n")
    assert data.resolve_template("auto", tok) == "chat"


def test_length_rule_drop_and_truncate(tok):
    long = rows_mod.Example(messages=[{"role": "user", "content": "word " * 200}], response="ok " * 50, instruction="x")
    short = rows_mod.Example(messages=[{"role": "user", "content": "hi"}], response="ok", instruction="hi")
    enc, stats = data.encode_examples([long, short], tok, template="chat", max_prompt_tokens=32,
                                      max_total_tokens=48, overlong="drop")
    assert stats.dropped_prompt == 1 and len(enc) == 1
    enc, stats = data.encode_examples([long, short], tok, template="chat", max_prompt_tokens=32,
                                      max_total_tokens=48, overlong="truncate")
    assert stats.truncated_prompt == 1 and stats.truncated_response == 1
    assert len(enc[0].prompt_ids) == 32 and len(enc[0].prompt_ids) + len(enc[0].response_ids) == 48
    # the kept part is the END of the prompt (assistant header included)
    assert tok.decode(enc[0].prompt_ids).endswith("<|im_start|>assistant\n")


def test_prepare_datasets_empty_after_filter(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "word " * 300, "output": "x"}])
    cfg = DataConfig(train=str(path), max_prompt_tokens=8, max_total_tokens=16, overlong="drop")
    with pytest.raises(UserError, match="no examples left"):
        data.prepare_datasets(cfg, tok, 0, lambda s: None)


def test_data_stream_is_a_pure_function_of_position():
    a = data.take_indices(10, 3, 0, 25)
    b = data.take_indices(10, 3, 0, 7) + data.take_indices(10, 3, 7, 18)
    assert a == b
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert a[:10] != a[10:20]


def test_shared_instruct_data_loads():
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "instruct-dev.jsonl"
    if not path.exists():
        pytest.skip("shared data not present")
    examples = rows_mod.load_examples(str(path))
    assert len(examples) == 400 and all(e.response for e in examples)
