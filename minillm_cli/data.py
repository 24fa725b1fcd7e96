"""Instruction data: read rows, detect their format, render prompts, tokenise, mask and collate.

Rows become `Example`s (prompt text + response text), then `Encoded` examples (token ids with the
prompt masked from the loss and EOS appended to the response, so the stop decision is trained).

Length rule (stated once, applied everywhere): a prompt longer than `max_prompt_tokens` is either
dropped or cut to its LAST `max_prompt_tokens` tokens (`overlong`), because the end of a rendered
prompt holds the question and the assistant header; the response is then cut so that prompt +
response fits `max_total_tokens` (a cut response loses its EOS). Counts of dropped and truncated rows
are reported by `encode_examples`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from minillm_cli.errors import UserError

if TYPE_CHECKING:  # the CLI imports this module's names lazily; keep torch out of its import path
    import torch
    from minillm_cli.config import DataConfig

# The instruction template of the MiniLLM paper's data pipeline (Alpaca style).
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCTION_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

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


@dataclass
class Encoded:
    """A tokenised example: `prompt_ids` then `response_ids` (response ends with EOS unless cut)."""

    prompt_ids: list[int]
    response_ids: list[int]
    index: int
    """Index of the example in its dataset (for data-order bookkeeping and SeqKD caching)."""


@dataclass
class EncodeStats:
    kept: int = 0
    dropped_prompt: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0

    def summary(self) -> str:
        return (
            f"{self.kept} examples kept; {self.dropped_prompt} dropped (prompt too long), "
            f"{self.truncated_prompt} prompts cut to their last tokens, {self.truncated_response} responses cut"
        )


# ------------------------------------------------------------------------------------ reading
def file_sha256(path: str | Path) -> str:
    """Content hash of a data file (provenance in checkpoints and model cards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    return _valid_text(value, f"{where}: column '{key}'")


def _valid_text(value: str, what: str) -> str:
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
            _valid_text(m["role"], f"{where}: messages[{i}].role")
            _valid_text(m["content"], f"{where}: messages[{i}].content")
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
    references = [_valid_text(r, f"{where}: column 'references'") for r in refs if isinstance(r, str)] \
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


# ------------------------------------------------------------------------------- tokenisation
def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else `instruction`."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "instruction"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.template: chat was asked for but the tokenizer has no chat template; use instruction")
    return template


def render_prompt(ex: Example, tokenizer: Any, template: str) -> str:
    """The prompt text the model sees before its response (ends with the assistant header)."""
    if template == "chat":
        return tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    if ex.input.strip():
        return INSTRUCTION_TEMPLATE_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
    return INSTRUCTION_TEMPLATE.format(instruction=ex.messages[-1]["content"] if not ex.instruction else ex.instruction)


def encode_prompt(ex: Example, tokenizer: Any, template: str) -> list[int]:
    text = render_prompt(ex, tokenizer, template)
    # The rendered prompt already holds any special tokens the template wants (BOS, <|im_start|>...).
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if template == "instruction" and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_examples(
    examples: list[Example],
    tokenizer: Any,
    *,
    template: str,
    max_prompt_tokens: int,
    max_total_tokens: int,
    overlong: str = "truncate",
    with_response: bool = True,
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenise examples and enforce the length rule of this module's docstring."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; responses need one so the stop decision is trained")
    stats = EncodeStats()
    out: list[Encoded] = []
    for i, ex in enumerate(examples):
        prompt = encode_prompt(ex, tokenizer, template)
        if len(prompt) > max_prompt_tokens:
            if overlong == "drop":
                stats.dropped_prompt += 1
                continue
            prompt = prompt[-max_prompt_tokens:]
            stats.truncated_prompt += 1
        response: list[int] = []
        if with_response:
            response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [eos]
            room = max_total_tokens - len(prompt)
            if len(response) > room:
                response = response[:room]
                stats.truncated_response += 1
        out.append(Encoded(prompt_ids=prompt, response_ids=response, index=i))
    stats.kept = len(out)
    return out, stats


def split_dev(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of examples (at least 1 when fraction > 0) with a seeded shuffle."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, int(round(len(examples) * fraction)))
    dev_idx = set(order[:n_dev])
    return [e for i, e in enumerate(examples) if i not in dev_idx], [e for i, e in enumerate(examples) if i in dev_idx]


# ----------------------------------------------------------------------------------- collate
def collate_sft(batch: list[Encoded], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded prompt+response: input_ids/attention_mask (B, L) and labels (B, L) with -100 on
    prompt and padding, so the loss covers response tokens (incl. EOS) only."""
    import torch

    length = max(len(e.prompt_ids) + len(e.response_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        seq = e.prompt_ids + e.response_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.response_ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(batch: list[Encoded], pad_id: int) -> dict[str, "torch.Tensor"]:
    """The layout shared by training and rollouts: LEFT-padded prompts (B, P) and RIGHT-padded
    responses (B, T), each with its mask. Response token t sits at column P + t of the concatenation,
    so one forward with `logits_to_keep=T+1` gives the logits of every response position and none
    of the prompt's (the output head is a large share of a small model's compute)."""
    import torch

    prompt_ids, prompt_mask = collate_prompts(batch, pad_id)
    length = max(max(len(e.response_ids) for e in batch), 1)
    resp = torch.full((len(batch), length), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.response_ids)
        if n:
            resp[row, :n] = torch.tensor(e.response_ids)
            resp_mask[row, :n] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": resp, "response_mask": resp_mask}


def collate_prompts(batch: list[Encoded], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Left-padded prompts for generation: ids and attention mask, both (B, P)."""
    import torch

    length = max(len(e.prompt_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.prompt_ids)
        ids[row, length - n :] = torch.tensor(e.prompt_ids)
        mask[row, length - n :] = 1
    return ids, mask


# ------------------------------------------------------------------------------------ corpus
def load_corpus(path: str, tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Plain text, one document per line, tokenised and cut into segments of `max_tokens` ids
    (each document ends with EOS; segments shorter than 8 tokens are dropped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.corpus: file not found: {path}")
    segments: list[list[int]] = []
    eos = tokenizer.eos_token_id
    try:
        with open(p, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _valid_text(line.strip(), f"data.corpus: {path}:{lineno}")
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                segments += [ids[i : i + max_tokens] for i in range(0, len(ids), max_tokens)]
    except UnicodeDecodeError:
        raise UserError(f"data.corpus: {path}: not UTF-8 text") from None
    segments = [s for s in segments if len(s) >= 8]
    if not segments:
        raise UserError(f"data.corpus: {path} holds no usable text")
    return segments


def collate_corpus(batch: list[list[int]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded LM batch: input_ids/attention_mask (B, L), labels = input_ids with -100 on pad."""
    import torch

    length = max(len(s) for s in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prepare_datasets(
    cfg: "DataConfig", tokenizer: Any, seed: int, console_print: Any = print, need_response: bool = True
) -> tuple[list[Encoded], list[Encoded], list[Example], list[Example]]:
    """Load, split and tokenise train/dev per the data section; prints the length-rule counts.

    Returns:
        (train_encoded, dev_encoded, train_examples, dev_examples)
    """
    if cfg.train is None:
        raise UserError("data.train: no training data given (set data.train or pass --data FILE)")
    train = load_examples(cfg.train, cfg.format, cfg.split)
    if cfg.max_train_samples is not None:
        train = train[: cfg.max_train_samples]
    if cfg.dev is not None:
        dev = load_examples(cfg.dev, cfg.format, "validation" if cfg.dev.startswith("hub:") else "train")
    else:
        train, dev = split_dev(train, cfg.dev_fraction, seed)
    dev = dev[: cfg.dev_max_samples]
    train, dev = with_system(train, cfg.system_prompt), with_system(dev, cfg.system_prompt)
    template = resolve_template(cfg.template, tokenizer)
    kw = dict(template=template, max_prompt_tokens=cfg.max_prompt_tokens, max_total_tokens=cfg.max_total_tokens,
              overlong=cfg.overlong)
    train_enc, stats = encode_examples(train, tokenizer, **kw)
    console_print(f"data.train: {stats.summary()} (template: {template})")
    if not train_enc:
        raise UserError(f"data.train: no examples left after the length rule ({stats.summary()})")
    dev_enc, _ = encode_examples(dev, tokenizer, **kw)
    return train_enc, dev_enc, train, dev


def take_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices `start .. start+count-1` of an endless, seeded stream of epochs over `n` examples.

    Epoch e is a permutation of range(n) seeded by (seed, e), so the data order is a pure function of
    the stream position: resuming needs nothing but the position (stored in the checkpoint).
    """
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        chunk = order[offset : offset + (count - len(out))]
        out += chunk
        pos += len(chunk)
    return out
