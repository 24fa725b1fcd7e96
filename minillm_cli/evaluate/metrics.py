"""Evaluation metrics as pure functions on strings and arrays (no model code, no torch).

Units: Rouge-L, exact match, Dist-n and accuracy are percentages (0..100, as in the MiniLLM paper);
ECE is a fraction (0..1); KL sums in the exposure-bias curve are in nats.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

# Built on first use: importing rouge_score pulls in nltk (about a second), which `minillm --help`
# should not pay for.
_ROUGE_SCORER: RougeScorer | None = None

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _as_list(references: str | Sequence[str]) -> list[str]:
    """One reference or several -> a non-empty list of references."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("no reference given")
    return refs


def _rouge_scorer() -> RougeScorer:
    """The shared Rouge-L scorer (Porter stemming, the package's default tokenizer), built once."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence-level Rouge-L F-measure of one prediction, max over its references, times 100.

    With LCS the longest common subsequence of the token lists of prediction p and reference r:
    P = LCS / |p|, R = LCS / |r|, F = 2PR / (P + R). Tokens come from `rouge-score`'s default
    tokenizer: lower-case, every run of characters outside [a-z0-9] is a separator (so non-ASCII text
    yields no tokens), words longer than 3 characters are Porter-stemmed ("running" -> "run").

    Args:
        prediction: The generated response.
        references: One reference or a list of references.

    Returns:
        max_r F(prediction, r) * 100, in [0, 100]; 0 when either side has no tokens.

    Raises:
        ValueError: If `references` is an empty list.
    """
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_list(references))


def rouge_l_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    """Rouge-L (precision, recall, F-measure) × 100 of one prediction against one reference (the
    tokenisation of `rouge_l`): recall grows with a longer prediction, precision shrinks."""
    s = _rouge_scorer().score(reference, prediction)["rougeL"]
    return 100.0 * s.precision, 100.0 * s.recall, 100.0 * s.fmeasure


def corpus_rouge_l(predictions: Sequence[str], references_list: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of `rouge_l(prediction, references)` (each already max over references, x100).

    Args:
        predictions: One generated response per example.
        references_list: Per example, one reference or a list of references.

    Returns:
        The mean Rouge-L in [0, 100].

    Raises:
        ValueError: If the two lists differ in length or are empty.
    """
    _check_same_length(predictions, references_list, "predictions", "references")
    return float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references_list)]))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official answer normalisation.

    Lower-case, delete ASCII punctuation, delete the articles "a", "an", "the" (whole words), and
    collapse whitespace to single spaces. algorithm.md names only the first, second and last step;
    we follow the official script, which also drops articles, so "The cat." == "cat".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """Exact match after SQuAD normalisation (`normalize_answer`), max over references, times 100.

    Args:
        prediction: The generated response.
        references: One reference or a list of references.

    Returns:
        100.0 if the normalised prediction equals some normalised reference, else 0.0.

    Raises:
        ValueError: If `references` is an empty list.
    """
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in _as_list(references)) else 0.0


def distinct_n(texts: Sequence[str], n: int = 4) -> float:
    """Dist-n: distinct n-grams / all n-grams over all generated responses, times 100.

    Tokens are whitespace-separated words (`str.split()`, case and punctuation kept), so the number
    does not depend on any model's tokenizer. N-grams are taken inside each response (none spans two
    responses); the distinct set is shared across responses, so a 4-gram repeated by two responses
    counts once in the numerator and twice in the denominator.

    Args:
        texts: The generated responses.
        n: The n-gram order (4 for the paper's Dist-4).

    Returns:
        The ratio times 100, in [0, 100]; 0.0 when no response has n tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not ngrams:
        return 0.0
    return 100.0 * len(set(ngrams)) / len(ngrams)


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Share of predictions equal to their label, times 100.

    Raises:
        ValueError: If the two lists differ in length or are empty.
    """
    _check_same_length(predictions, labels, "predictions", "labels")
    return 100.0 * float(np.mean([p == y for p, y in zip(predictions, labels)]))


def expected_calibration_error(
    confidences: Sequence[float], predictions: Sequence[Any], labels: Sequence[Any], n_bins: int = 10
) -> float:
    """Expected calibration error with `n_bins` equal-width confidence bins over [0, 1].

        ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|

    where B_b holds the examples whose confidence falls in bin b, acc(B_b) is the share of them
    predicted correctly and conf(B_b) their mean confidence; empty bins contribute nothing. Bin b is
    [b/n_bins, (b+1)/n_bins), except that the last bin also holds confidence 1.0. The edges are
    compared as the floats nearest b/n_bins, so a confidence of exactly 0.3 lands in [0.3, 0.4).

    Args:
        confidences: Per example, the probability the model gave its predicted label, in [0, 1].
        predictions: Per example, the predicted label.
        labels: Per example, the true label.
        n_bins: The number of bins.

    Returns:
        ECE as a fraction in [0, 1] (not x100).

    Raises:
        ValueError: On lists of different lengths, empty lists or a confidence outside [0, 1].
    """
    _check_same_length(confidences, predictions, "confidences", "predictions")
    _check_same_length(predictions, labels, "predictions", "labels")
    conf = np.asarray(confidences, dtype=np.float64)  # (N,)
    if np.any(~np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("confidences must lie in [0, 1]")
    correct = np.array([p == y for p, y in zip(predictions, labels)], dtype=np.float64)  # (N,)
    edges = np.array([b / n_bins for b in range(n_bins + 1)])  # (n_bins + 1,)
    bins = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)  # (N,)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def exposure_bias_curve(
    kl_student_prefix: Any, kl_teacher_prefix: Any, mask_s: Any, mask_t: Any
) -> dict[str, list[float] | list[int]]:
    """Accumulated excess error ExAccErr(l) from per-position teacher->student KLs.

    Row i of all four arrays belongs to prompt i; column t is response position t + 1.
    `kl_student_prefix[i, t]` is KL(p_teacher || q_student) of the next-token distributions after the
    first t response tokens sampled by the student, `kl_teacher_prefix` the same after tokens sampled
    by the teacher; masks are 1 on real response positions. Then, for l = 1, 2, ...:

        R(l) = mean_i sum_{t<=l} kl_student_prefix[i, t]
        E(l) = mean_i sum_{t<=l} kl_teacher_prefix[i, t]
        ExAccErr(l) = (R(l) - E(l)) / E(l) * 100

    Shorter sequences: at length l the means run over the prompts whose student-sampled AND
    teacher-sampled responses both have their first l positions unmasked, so R(l) and E(l) always
    compare the same prompts and no ended sequence is padded with zeros. The curve stops at the
    largest l that still has such a prompt; `count[l]` says how many prompts each point averages.
    ExAccErr is NaN where E(l) == 0.

    Args:
        kl_student_prefix: (N, L) per-position KL on student-sampled prefixes (numpy or CPU tensor).
        kl_teacher_prefix: (N, L) the same on teacher-sampled prefixes.
        mask_s: (N, L) 1/True on the student responses' real positions.
        mask_t: (N, L) 1/True on the teacher responses' real positions.

    Returns:
        {"lengths": [1..L'], "R": [...], "E": [...], "exaccerr": [...], "count": [...]}, lists of
        plain Python numbers of equal length L' <= L (empty when no prompt has a response token).

    Raises:
        ValueError: If the four arrays are not all of the same 2-D shape.
    """
    kl_s = np.asarray(kl_student_prefix, dtype=np.float64)  # (N, L)
    kl_t = np.asarray(kl_teacher_prefix, dtype=np.float64)  # (N, L)
    m_s = np.asarray(mask_s).astype(bool)  # (N, L)
    m_t = np.asarray(mask_t).astype(bool)  # (N, L)
    if kl_s.ndim != 2 or not (kl_s.shape == kl_t.shape == m_s.shape == m_t.shape):
        raise ValueError(
            f"exposure_bias_curve needs four (N, L) arrays of one shape, got {kl_s.shape}, {kl_t.shape}, "
            f"{m_s.shape}, {m_t.shape}"
        )
    # alive[i, t]: both of prompt i's responses are real at every position up to t. Cumulative AND
    # rather than the mask itself, so a stray hole in a mask ends that sequence there.
    alive = np.logical_and.accumulate(m_s & m_t, axis=1)  # (N, L)
    # Zero the KL where a row is not alive, so masked garbage (even NaN) never enters a sum.
    cum_s = np.cumsum(np.where(alive, kl_s, 0.0), axis=1)  # (N, L)
    cum_t = np.cumsum(np.where(alive, kl_t, 0.0), axis=1)  # (N, L)
    count = alive.sum(axis=0)  # (L,) non-increasing
    n_len = int((count > 0).sum())
    lengths, big_r, big_e, exaccerr = [], [], [], []
    for t in range(n_len):
        r = float(cum_s[alive[:, t], t].mean())
        e = float(cum_t[alive[:, t], t].mean())
        lengths.append(t + 1)
        big_r.append(r)
        big_e.append(e)
        exaccerr.append((r - e) / e * 100.0 if e != 0.0 else math.nan)
    return {"lengths": lengths, "R": big_r, "E": big_e, "exaccerr": exaccerr, "count": count[:n_len].tolist()}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) of per-seed values.

    Sample std because the seeds are a sample of the seeds one could have drawn; with a single
    value there is no spread to estimate, so the std is None (shown as a bare mean).

    Raises:
        ValueError: If `values` is empty.
    """
    if len(values) == 0:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return float(arr.mean()), std


BOOTSTRAP_RESAMPLES = 2000
"""Resamples of `paired_bootstrap` (the Monte-Carlo error of a 95% percentile end is ~0.1 SE)."""
BOOTSTRAP_SEED = 0
"""Fixed seed of the resampling, so that a report is reproducible."""


@dataclass(frozen=True)
class PairedDifference:
    """A model's difference to a baseline on one metric, with its paired bootstrap interval.

    Attributes:
        diff: metric(model) − metric(baseline), exactly the difference of the two reported means.
        low, high: the `confidence` percentile interval of the difference.
        prompts: the number of prompts (resampling units) both models were measured on.
    """

    diff: float
    low: float
    high: float
    prompts: int

    @property
    def within_noise(self) -> bool:
        """True when the interval covers 0: the data cannot tell the two models apart on this metric."""
        return self.low <= 0.0 <= self.high


def _seed_mean_of_ratios(values: np.ndarray, weights: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Metric of each resample: mean over seeds of Σ_i c_i·x_si / Σ_i c_i·w_si.

    values, weights: (S, N); counts: (R, N) prompt multiplicities. Returns (R,).
    """
    num = counts @ values.T  # (R, S)
    den = counts @ (weights.T if weights is not None else np.ones_like(values.T))  # (R, S)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).mean(-1)  # NaN where a seed has no weight in a resample


def paired_bootstrap(
    values: Any, baseline: Any, weights: Any = None, baseline_weights: Any = None, *,
    resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95, seed: int = BOOTSTRAP_SEED,
) -> PairedDifference:
    """Difference of a model to a baseline measured on the same prompts × seeds, with a paired
    bootstrap percentile interval that resamples prompts.

    A metric is a mean over seeds of a per-seed aggregate over prompts:

        M = 1/S Σ_s Σ_i x_si / Σ_i w_si        (w = 1: the per-seed mean over prompts, e.g. Rouge-L;
                                               w = token counts, x = per-prompt token sums: a token mean)

    Each resample draws N prompt indices with replacement (one draw shared by both models and all
    seeds: the prompt is the unit, its seeds stay together, and both models see the same prompts),
    and computes M(model) − M(baseline) on them. The interval is the (1 − confidence)/2 and
    (1 + confidence)/2 percentiles of those differences; `diff` is the difference on all prompts.

    Args:
        values: (S, N) per seed and prompt, the model's metric (w = 1) or its numerator.
        baseline: (S, N) the same for the baseline, prompts in the same order.
        weights, baseline_weights: (S, N) denominators (e.g. valid-token counts), or None for 1.
        resamples: Bootstrap resamples.
        confidence: Interval level, in (0, 1).
        seed: RNG seed of the resampling.

    Returns:
        A `PairedDifference`.

    Raises:
        ValueError: On shapes that differ or hold no prompt, or a bad `resamples` / `confidence`.
    """
    a, b = np.atleast_2d(np.asarray(values, dtype=np.float64)), np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    wa = None if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    wb = None if baseline_weights is None else np.atleast_2d(np.asarray(baseline_weights, dtype=np.float64))
    for name, arr in (("baseline", b), ("weights", wa), ("baseline_weights", wb)):
        if arr is not None and arr.shape != a.shape:
            raise ValueError(f"{name} has shape {arr.shape}, values {a.shape}: the same prompts and seeds are needed")
    if a.size == 0:
        raise ValueError("paired_bootstrap of no prompts")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    n = a.shape[1]
    ones = np.ones((1, n))
    diff = float(_seed_mean_of_ratios(a, wa, ones)[0] - _seed_mean_of_ratios(b, wb, ones)[0])
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, resamples, 250):  # (250, N) multiplicities at a time bound the memory
        draws = rng.integers(0, n, size=(min(250, resamples - start), n))
        counts = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)  # (r, N)
        deltas.append(_seed_mean_of_ratios(a, wa, counts) - _seed_mean_of_ratios(b, wb, counts))
    delta = np.concatenate(deltas)
    delta = delta[np.isfinite(delta)]
    if delta.size == 0:
        return PairedDifference(diff=diff, low=math.nan, high=math.nan, prompts=n)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(delta, [tail, 100.0 - tail])
    return PairedDifference(diff=diff, low=float(low), high=float(high), prompts=n)


def _check_same_length(a: Sequence[Any], b: Sequence[Any], name_a: str, name_b: str) -> None:
    """Raise ValueError unless both sequences are non-empty and equally long."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {name_a} but {len(b)} {name_b}")
    if len(a) == 0:
        raise ValueError(f"no {name_a}")
