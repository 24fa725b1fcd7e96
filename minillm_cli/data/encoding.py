"""Instruction data: render prompts, tokenise, mask and collate; plain-text corpora; train/dev sets.

`Example`s (prompt text + response text, read by `minillm_cli.rows`) become `Encoded` examples
(token ids with the prompt masked from the loss and EOS appended to the response, so the stop
decision is trained).

Length rule (stated once, applied everywhere): a prompt longer than `max_prompt_tokens` is either
dropped or cut to its LAST `max_prompt_tokens` tokens (`overlong`), because the end of a rendered
prompt holds the question and the assistant header; the response is then cut so that prompt +
response fits `max_total_tokens` (a cut response loses its EOS). Counts of dropped and truncated rows
are reported by `encode_examples`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.data.rows import Example, load_examples, valid_text, with_system
from minillm_cli.errors import UserError

if TYPE_CHECKING:  # the CLI imports this module's names lazily; keep torch out of its import path
    import torch

    from minillm_cli.config.schema import DataConfig

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
                text = valid_text(line.strip(), f"data.corpus: {path}:{lineno}")
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
    def encode(examples: list[Example]) -> tuple[list[Encoded], EncodeStats]:
        return encode_examples(examples, tokenizer, template=template, max_prompt_tokens=cfg.max_prompt_tokens,
                               max_total_tokens=cfg.max_total_tokens, overlong=cfg.overlong)

    train_enc, stats = encode(train)
    console_print(f"data.train: {stats.summary()} (template: {template})")
    if not train_enc:
        raise UserError(f"data.train: no examples left after the length rule ({stats.summary()})")
    dev_enc, _ = encode(dev)
    return train_enc, dev_enc, train, dev


def teacher_prompts(encoded: list[Encoded], examples: list[Example], teacher_tokenizer: Any,
                    cfg: "DataConfig") -> dict[int, list[int]]:
    """Cross-tokenizer runs: each encoded example's prompt rendered with the TEACHER's template and
    tokenizer (its last `data.max_prompt_tokens` tokens), by `Encoded.index`."""
    template = resolve_template(cfg.template, teacher_tokenizer)
    return {e.index: encode_prompt(examples[e.index], teacher_tokenizer, template)[-cfg.max_prompt_tokens:]
            for e in encoded}


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
