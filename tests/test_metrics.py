"""Evaluation metrics against values computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minillm_cli.evaluate.metrics import (
    accuracy,
    corpus_rouge_l,
    distinct_n,
    exact_match,
    expected_calibration_error,
    exposure_bias_curve,
    mean_std,
    normalize_answer,
    paired_bootstrap,
    rouge_l,
    rouge_l_scores,
)

# --- Rouge-L -------------------------------------------------------------------------------------

def test_rouge_l_counts_lcs_with_stemming() -> None:
    # prediction tokens: the cat is run(ning) home   (5)
    # reference tokens:  a cat run(s) home           (4)
    # LCS = cat run home = 3 (only because Porter stemming maps running and runs to "run")
    # P = 3/5, R = 3/4, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    assert rouge_l("The cat is running home.", "A cat runs home") == pytest.approx(200 / 3)


def test_rouge_l_scores_split_precision_and_recall() -> None:
    # the example above: P = 3/5, R = 3/4, F = 2/3; a longer prediction trades precision for recall
    p, r, f = rouge_l_scores("The cat is running home.", "A cat runs home")
    assert (p, r, f) == pytest.approx((60.0, 75.0, 200 / 3))
    assert f == pytest.approx(rouge_l("The cat is running home.", "A cat runs home"))
    p2, r2, _ = rouge_l_scores("The cat is running home and then it sleeps.", "A cat runs home")
    assert r2 == pytest.approx(r) and p2 < p


def test_rouge_l_is_a_subsequence_not_a_bag() -> None:
    # "b a c" vs "a b c": LCS = 2 ("a c" or "b c"), P = R = 2/3, F = 2/3
    assert rouge_l("b a c", "a b c") == pytest.approx(200 / 3)


def test_rouge_l_max_over_references() -> None:
    # vs "the cat sat": LCS = the cat = 2, P = 2/5, R = 2/3, F = (2*4/15)/(16/15) = 1/2
    assert rouge_l("the cat is running home", "the cat sat") == pytest.approx(50.0)
    assert rouge_l("the cat is running home", ["the cat sat", "a cat runs home"]) == pytest.approx(200 / 3)
    assert rouge_l("the cat is running home", ["dog barks"]) == 0.0


def test_rouge_l_case_punctuation_and_empty() -> None:
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(100.0)
    assert rouge_l("", "hello world") == 0.0
    with pytest.raises(ValueError):
        rouge_l("hello", [])


def test_corpus_rouge_l_is_the_mean() -> None:
    preds = ["The cat is running home.", "hello world"]
    refs = [["dog", "A cat runs home"], "Hello world"]
    assert corpus_rouge_l(preds, refs) == pytest.approx((200 / 3 + 100) / 2)
    with pytest.raises(ValueError):
        corpus_rouge_l(preds, refs[:1])


# --- exact match ---------------------------------------------------------------------------------

def test_normalize_answer_follows_squad() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match() -> None:
    assert exact_match("The Cat!", "cat") == 100.0
    assert exact_match("a cat", "the cat") == 100.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("Paris.", ["London", "paris"]) == 100.0
    assert exact_match("Rome", ["London", "paris"]) == 0.0


# --- Dist-n --------------------------------------------------------------------------------------

def test_distinct_4() -> None:
    # 4-grams: (a b c d), (b c d e) | (a b c d) | none -> 2 distinct of 3
    assert distinct_n(["a b c d e", "a b c d", "x y z"], n=4) == pytest.approx(200 / 3)
    # the n-grams do not span responses: "c d" + "e f" would make (c d e f) if joined
    assert distinct_n(["a b c d", "e f g h"], n=4) == pytest.approx(100.0)


def test_distinct_n_small_n_and_empty() -> None:
    assert distinct_n(["a a a"], n=2) == pytest.approx(50.0)  # (a a), (a a)
    assert distinct_n(["x y z"], n=4) == 0.0
    assert distinct_n([], n=4) == 0.0


# --- calibration ---------------------------------------------------------------------------------

def test_ece_hand_example() -> None:
    conf = [0.95, 0.85, 0.62, 0.68, 0.3]
    pred = [1, 1, 0, 1, 0]
    label = [1, 0, 0, 0, 0]  # correct: 1 0 1 0 1
    # bin 9: |1 - .95| * 1/5 = .01;  bin 8: |0 - .85| * 1/5 = .17
    # bin 6: acc .5, conf .65 -> .15 * 2/5 = .06;  bin 3: |1 - .3| * 1/5 = .14
    assert expected_calibration_error(conf, pred, label) == pytest.approx(0.38)
    assert accuracy(pred, label) == pytest.approx(60.0)


def test_ece_bin_edges() -> None:
    # 0.3 shares [0.3, 0.4) with 0.35: acc .5, conf .325 -> .175
    # (were 0.3 in [0.2, 0.3) it would be .7 * .5 + .35 * .5 = .525)
    assert expected_calibration_error([0.3, 0.35], ["y", "y"], ["y", "n"]) == pytest.approx(0.175)
    assert expected_calibration_error([1.0], [0], [0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.5, 0.5], [0, 0], [0, 1]) == pytest.approx(0.0)
    # two bins: [0, .5) and [.5, 1]; .2 and .4 together: acc 0, conf .3 -> .3 * 2/3; .9 alone: .1/3
    assert expected_calibration_error([0.2, 0.4, 0.9], [1, 1, 1], [0, 0, 1], n_bins=2) == pytest.approx(0.7 / 3)
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [0], [0])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [0, 1], [0, 1])


# --- exposure bias -------------------------------------------------------------------------------

def test_exposure_bias_curve_hand_example() -> None:
    kl_s = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan]])  # NaN sits on a masked position
    kl_t = np.ones((2, 3))
    mask_s = np.array([[1, 1, 1], [1, 1, 0]])
    mask_t = np.ones((2, 3))
    out = exposure_bias_curve(kl_s, kl_t, mask_s, mask_t)
    # l=1: R = (1 + 3)/2 = 2, E = 1 -> 100
    # l=2: R = (3 + 7)/2 = 5, E = 2 -> 150
    # l=3: only prompt 0 is still long enough: R = 6, E = 3 -> 100
    assert out["lengths"] == [1, 2, 3]
    assert out["count"] == [2, 2, 1]
    assert out["R"] == pytest.approx([2.0, 5.0, 6.0])
    assert out["E"] == pytest.approx([1.0, 2.0, 3.0])
    assert out["exaccerr"] == pytest.approx([100.0, 150.0, 100.0])


def test_exposure_bias_curve_pairs_prompts_and_stops() -> None:
    # prompt 0's teacher response has a hole at position 2: prompt 0 counts only at l = 1
    kl_s = np.array([[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    kl_t = np.array([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    mask_t = np.array([[1, 0, 1], [1, 1, 0]])
    out = exposure_bias_curve(kl_s, kl_t, np.ones((2, 3)), mask_t)
    # l=1: R = 3, E = 1.5 -> 100; l=2: only prompt 1: R = 8, E = 2 -> 300; l=3: nobody
    assert out["lengths"] == [1, 2]
    assert out["exaccerr"] == pytest.approx([100.0, 300.0])
    empty = exposure_bias_curve(kl_s, kl_t, np.zeros((2, 3)), mask_t)
    assert empty["lengths"] == [] and empty["exaccerr"] == []
    zero = exposure_bias_curve(kl_s, np.zeros((2, 3)), np.ones((2, 3)), np.ones((2, 3)))
    assert math.isnan(zero["exaccerr"][0])
    with pytest.raises(ValueError):
        exposure_bias_curve(kl_s, kl_t[:, :2], np.ones((2, 3)), mask_t)


# --- seeds ---------------------------------------------------------------------------------------

def test_mean_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    # deviations 1.5, .5, .5, 1.5 -> squares sum 5 -> sample variance 5/3
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([5.0]) == (5.0, None)
    with pytest.raises(ValueError):
        mean_std([])


# --- paired bootstrap ----------------------------------------------------------------------------

def test_paired_bootstrap_identical_models_is_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 100, size=(3, 20))  # 3 seeds × 20 prompts
    d = paired_bootstrap(x, x.copy())
    assert (d.diff, d.low, d.high, d.prompts) == (0.0, 0.0, 0.0, 20)
    assert d.within_noise


def test_paired_bootstrap_constant_shift_is_exactly_that_shift() -> None:
    # Prompts differ wildly (0..100), the model is 2.5 better on every prompt and seed: pairing removes
    # the prompt variance entirely, so every resample gives 2.5.
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 100, size=(2, 50))
    d = paired_bootstrap(base + 2.5, base)
    assert d.diff == pytest.approx(2.5) and d.low == pytest.approx(2.5) and d.high == pytest.approx(2.5)
    assert not d.within_noise


def test_paired_bootstrap_two_prompts_by_hand_is_within_noise() -> None:
    # Differences per prompt: 0 and 2. A resample of 2 prompts has mean difference 0 (p = 1/4),
    # 1 (p = 1/2) or 2 (p = 1/4); the 2.5 / 97.5 percentiles are therefore 0 and 2.
    d = paired_bootstrap([[10.0, 32.0]], [[10.0, 30.0]])
    assert d.diff == pytest.approx(1.0)
    assert (d.low, d.high) == (pytest.approx(0.0), pytest.approx(2.0))
    assert d.within_noise  # the interval reaches 0: "within noise"


def test_paired_bootstrap_clear_gain_excludes_zero() -> None:
    # Every prompt gains 1, 2 or 3: any mean of them lies in [1, 3].
    gain = np.tile([1.0, 2.0, 3.0], 10)
    base = np.linspace(0, 50, 30)
    d = paired_bootstrap(base + gain, base)
    assert d.diff == pytest.approx(2.0)
    assert 1.0 <= d.low < 2.0 < d.high <= 3.0 and not d.within_noise


def test_paired_bootstrap_keeps_the_seeds_of_a_prompt_together() -> None:
    # Seed 1 is 1 better, seed 2 is 1 worse, on every prompt: averaged over the seeds of each prompt
    # the difference is 0 everywhere, so the interval is [0, 0]. (Resampling seeds apart from their
    # prompt would invent a spread.)
    base = np.array([[10.0, 20.0, 40.0], [15.0, 25.0, 35.0]])
    d = paired_bootstrap(base + np.array([[1.0], [-1.0]]), base)
    assert d.diff == pytest.approx(0.0, abs=1e-12)
    assert d.low == pytest.approx(0.0, abs=1e-12) and d.high == pytest.approx(0.0, abs=1e-12)


def test_paired_bootstrap_token_means_weight_by_tokens() -> None:
    # A token-mean metric: per prompt the sum over its tokens and the token count. Model: sums 1 and 0
    # over 1 and 3 tokens -> 1/4 (a per-prompt mean would say 1/2); baseline: 0.
    d = paired_bootstrap([[1.0, 0.0]], [[0.0, 0.0]], weights=[[1.0, 3.0]], baseline_weights=[[1.0, 3.0]])
    assert d.diff == pytest.approx(0.25)
    # Resamples {1,1}: 1, {1,2}: 1/4, {2,2}: 0 -> percentiles 0 and 1.
    assert (d.low, d.high) == (pytest.approx(0.0), pytest.approx(1.0))


def test_paired_bootstrap_agrees_with_the_normal_interval_on_many_prompts() -> None:
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.5, 1.0, size=400)
    base = rng.uniform(0, 10, size=400)
    d = paired_bootstrap(base + diffs, base)
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(400)  # ≈ 0.098
    assert d.diff == pytest.approx(diffs.mean())
    assert d.low == pytest.approx(diffs.mean() - half, abs=0.2 * half)
    assert d.high == pytest.approx(diffs.mean() + half, abs=0.2 * half)


def test_paired_bootstrap_is_reproducible_and_checks_shapes() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 30)), rng.normal(size=(2, 30))
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    assert paired_bootstrap(a, b, seed=1) != paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(a, b[:, :29])
    with pytest.raises(ValueError, match="no prompts"):
        paired_bootstrap(np.zeros((1, 0)), np.zeros((1, 0)))
