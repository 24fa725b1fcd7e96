"""Instruction rows: read a jsonl/json/csv/parquet file or a hub dataset, detect its format and turn
each row into an `Example` (chat messages up to the response, the response, its references).

Every problem with a row is a `UserError` naming its `file:line` (or `file:row i`); tokenisation and
collation of the examples live in `minillm_cli.data`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError

FORMAT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # format: (required columns, optional columns)
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context",)),
    "prompt_response": (("prompt", "response"), ()),
    "messages": (("messages",), ()),
}


@dataclass
class Example:
    """One instruction example before rendering: a chat (list of messages) ending with the user turn."""

    messages: list[dict[str, str]]
    """The conversation up to the response: [{"role": "user", "content": ...}, ...]."""
    response: str
    """The reference response (for SFT / KD / eval)."""
    instruction: str
    """Instruction text (alpaca/dolly), for the paper's instruction template."""
    input: str = ""
    where: str = ""
    """`file:line` of the row, for error messages."""
    references: list[str] = field(default_factory=list)
    """All acceptable references (eval takes the max over them); defaults to [response]."""


# ------------------------------------------------------------------------------------ reading
def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 BOM (Excel, Notepad) is not part of the data
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{lineno}", row))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict):  # {"data": [...]} or similar single-key wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        out.append((f"{path}:row {i}", row))
    return out


def _read_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        # line 1 is the header; DictReader.line_num is the physical line of the row's end
        try:
            return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: not a readable parquet file ({e.__class__.__name__}: {e})") from None
    return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, missing split: all end the same way for the user
        raise UserError(
            f"could not load dataset '{name}' (split {split}) from the Hugging Face hub ({e.__class__.__name__}); "
            "pass a local jsonl/json/csv/parquet file instead"
        ) from None
    return [(f"{name}[{split}]:row {i}", dict(row)) for i, row in enumerate(ds)]


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Read raw rows as (where, row) pairs from a local file or a hub dataset id."""
    if source.startswith("hub:"):
        return _read_hub(source[4:], split)
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # an embedded NUL byte, a name too long
        raise UserError(f"data file not found: {source!r}") from None
    if not exists:
        if "/" in source and not source.startswith((".", "/", "~")) and path.suffix == "":
            return _read_hub(source, split)
        raise UserError(f"data file not found: {source}")
    if path.is_dir():
        raise UserError(f"data path is a directory, expected a file: {source}")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise UserError(f"{source}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
    try:
        rows = readers[suffix](path)
    except UnicodeDecodeError:
        raise UserError(f"{source}: not UTF-8 text") from None
    if not rows:
        raise UserError(f"{source}: the data file is empty")
    return rows


# ---------------------------------------------------------------------------- format and rows
def detect_format(row: dict[str, Any], where: str) -> str:
    """Pick the row format from its columns (first match in FORMAT_KEYS order)."""
    for name, (required, _) in FORMAT_KEYS.items():
        if all(k in row for k in required):
            return name
    if "prompt" in row and "completion" in row:
        return "prompt_response"
    cols = ", ".join(sorted(row)) or "none"
    raise UserError(
        f"{where}: cannot detect the data format from columns [{cols}]; expected instruction/output (alpaca), "
        "instruction/response (dolly), prompt/response or messages"
    )


def _text(row: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: missing column '{key}'")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: column '{key}' must be a string, got {type(value).__name__}")
    return valid_text(value, f"{where}: column '{key}'")


def valid_text(value: str, what: str) -> str:
    """JSON escapes can spell a lone surrogate (`"\\ud83d"`, half of an emoji): not Unicode text,
    and no tokenizer accepts it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} holds invalid Unicode (a lone surrogate {value[e.start:e.end]!r}, "
                        "e.g. half of an emoji's escape pair)") from None
    return value


def row_to_example(row: dict[str, Any], fmt: str, where: str) -> Example:
    """Turn one raw row into an Example; a malformed row is an error naming `where`."""
    if fmt == "alpaca":
        ins, inp, out = _text(row, "instruction", where), _text(row, "input", where, False), _text(row, "output", where)
    elif fmt == "dolly":
        ins, inp, out = _text(row, "instruction", where), _text(row, "context", where, False), _text(row, "response", where)
    elif fmt == "prompt_response":
        ins, inp = _text(row, "prompt", where), ""
        out = _text(row, "response" if "response" in row else "completion", where)
    elif fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: every message needs string 'role' and 'content'")
            valid_text(m["role"], f"{where}: messages[{i}].role")
            valid_text(m["content"], f"{where}: messages[{i}].content")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise UserError(f"{where}: the last message must be the assistant's response, after a user turn")
        context = [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]]
        user = "\n\n".join(m["content"] for m in context if m["role"] == "user")
        resp = msgs[-1]["content"]
        return Example(messages=context, response=resp, instruction=user, where=where, references=[resp])
    else:
        raise UserError(f"{where}: unknown data format '{fmt}'")
    if not ins.strip():
        raise UserError(f"{where}: empty instruction/prompt")
    user = ins if not inp.strip() else f"{ins}\n\n{inp}"
    refs = row.get("references")
    references = [valid_text(r, f"{where}: column 'references'") for r in refs if isinstance(r, str)] \
        if isinstance(refs, list) and refs else [out]
    references = references or [out]
    return Example(
        messages=[{"role": "user", "content": user}], response=out, instruction=ins, input=inp, where=where,
        references=references,
    )


def load_examples(source: str, fmt: str = "auto", split: str = "train", require_response: bool = True) -> list[Example]:
    """Read a data source into Examples, detecting the format from the first row when fmt is auto."""
    rows = read_rows(source, split)
    first_where, first = rows[0]
    fmt = detect_format(first, first_where) if fmt == "auto" else fmt
    required = FORMAT_KEYS.get(fmt, ((), ()))[0]
    examples = []
    for where, row in rows:
        if not require_response:
            row = {**row}
            for key in required[1:]:
                row.setdefault(key, "")
        examples.append(row_to_example(row, fmt, where))
    return examples


def with_system(examples: list[Example], system_prompt: str | None) -> list[Example]:
    """Put a system message before each chat prompt (no-op for None or rows that have one)."""
    if system_prompt is None:
        return examples
    out = []
    for ex in examples:
        if ex.messages and ex.messages[0]["role"] == "system":
            out.append(ex)
            continue
        msgs = [{"role": "system", "content": system_prompt}, *ex.messages]
        out.append(Example(messages=msgs, response=ex.response, instruction=ex.instruction, input=ex.input,
                           where=ex.where, references=ex.references))
    return out

