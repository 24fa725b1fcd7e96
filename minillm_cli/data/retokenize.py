"""Cross-tokenizer scoring: the student's response as TEXT, re-tokenised for the teacher, and the
teacher's log-probabilities of that text handed back to the student's tokens (docs/algorithm.md §7).

For one response of student tokens y_1..y_T (y_T the student's EOS when the response finished):

1. `response_text`: the text is the decoded tokens before EOS. Each token gets the end offset (in
   characters) of the text it completes: the length of the decoded prefix y_1..y_t when that prefix
   is a prefix of the text, else the previous token's end (a byte-level token that ends inside a
   character covers no character; the token that completes the character covers it). EOS ends at
   len(text).
2. `scoring_tokens`: the teacher's own tokenisation of the text, each token with its end offset,
   then the teacher's EOS when the response finished (a truncated response gets none), at the
   sentinel offset len(text) + 1.
3. `assign`: every teacher token's log-probability goes to the student token that covers its last
   character (the teacher's EOS to the student's EOS). So for every row the assigned values sum
   exactly to log p_teacher(text [+ EOS] | the teacher's prompt).

What this approximates: p(text) is the sum over every tokenisation of the text; the teacher's one
canonical tokenisation stands for it (tokenisers are trained so that it carries nearly all the mass).

A row is NOT scored (`problem` set; the caller drops it and counts it, `xtok_mismatch`) when the text
does not survive the round trip: it holds U+FFFD (a token sequence that is not valid UTF-8, e.g. cut
inside a character), a special token other than EOS, or the teacher's tokenizer does not decode its
tokens back to the same text (it normalises whitespace or unicode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _ends(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """The end offset of each token in `text`: the decoded prefix's length when it is a prefix of the
    text, else the previous end (the token covers no whole character)."""
    ends, last = [], 0
    for i in range(len(ids)):
        prefix = _decode(tokenizer, ids[: i + 1])
        if text.startswith(prefix) and len(prefix) >= last:
            last = len(prefix)
        ends.append(last)
    return ends


@dataclass
class ResponseText:
    text: str
    ends: list[int]
    """(T,) end offset of each response token; the EOS (if any) ends at len(text)."""
    problem: str | None = None


def response_text(tokenizer: Any, ids: Sequence[int], finished: bool) -> ResponseText:
    """The text of a student response (`ids` with its EOS last when `finished`) and its token ends."""
    body = list(ids[:-1]) if finished else list(ids)
    text = _decode(tokenizer, body)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    ends = _ends(tokenizer, body, text) + ([len(text)] if finished else [])
    problem = None
    if REPLACEMENT in text:
        problem = f"the student's tokens are not valid UTF-8 text ({text[:40]!r})"
    elif specials & set(body):
        problem = f"a special token inside the response ({text[:40]!r})"
    elif body and ends[-1 - int(finished)] != len(text):
        problem = f"the student's tokens do not decode piece by piece to their text ({text[:40]!r})"
    return ResponseText(text, ends, problem)


@dataclass
class ScoringTokens:
    ids: list[int]
    ends: list[int]
    """End offset of each token; the teacher's EOS (if any) at len(text) + 1."""
    problem: str | None = None


def scoring_tokens(tokenizer: Any, text: str, finished: bool) -> ScoringTokens:
    """The teacher's tokenisation of `text` (+ its EOS when the response finished)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    back = _decode(tokenizer, ids)
    problem = None
    if back != text:
        problem = f"the teacher's tokenizer does not give the text back ({text[:40]!r} -> {back[:40]!r})"
    ends = _ends(tokenizer, ids, text) if problem is None else [0] * len(ids)
    if finished:
        ids, ends = [*ids, tokenizer.eos_token_id], [*ends, len(text) + 1]
    return ScoringTokens(ids, ends, problem)


def assign(student_ends: Sequence[int], teacher_ends: Sequence[int], teacher_logps: Sequence[float],
           finished: bool) -> list[float]:
    """Per student token, the sum of the log-probs of the teacher tokens whose last character it covers.

    Args:
        student_ends: (T,) end offset of each student token (non-decreasing); with `finished`, the
            last one is the EOS.
        teacher_ends: (U,) end offset of each teacher token (non-decreasing); with `finished`, the
            last one is the teacher's EOS (end len(text) + 1, given to the student's EOS).
        teacher_logps: (U,) the teacher's log-prob of each of its tokens.

    Returns:
        (T,) values that sum to sum(teacher_logps).

    Raises:
        ValueError: a teacher token ends after the student's text (the two do not cover the same text).
    """
    out = [0.0] * len(student_ends)
    n_text = len(student_ends) - int(finished)  # student tokens before the EOS
    eos_end = student_ends[-1] + 1 if finished else None  # the student's EOS ends at len(text)
    j = 0
    for end, logp in zip(teacher_ends, teacher_logps):
        if end == eos_end:
            out[-1] += logp  # the teacher's EOS: the student's stop decision
            continue
        last_char = max(end - 1, 0)
        while j < n_text and student_ends[j] <= last_char:
            j += 1
        if j >= n_text:
            raise ValueError(f"teacher token ending at {end} lies past the student's text ({n_text} tokens)")
        out[j] += logp
    return out
