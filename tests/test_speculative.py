"""Speculative sampling of the teacher-mixed p̃ (`rollout.sample(..., speculative_tokens=k)`).

Exactness is checked on an enumerable vocabulary: every complete response (EOS reachable, at most
`M` tokens) has an exact probability under p̃, computed from teacher-forced forwards over every
prefix, and the sampled sequences must fit those probabilities (chi-square goodness of fit). The
lockstep sampler passes the same test, and a sampler with a deliberately wrong replacement rule
fails it, so the test can tell. The cached decoding with rejected drafts as attention-mask holes
is checked against fresh forwards.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minillm_cli.sampling import mixture, speculative
from minillm_cli.sampling.batch import Rollout, concat_prompt_response, score
from minillm_cli.sampling.cached_lm import CachedLM
from minillm_cli.sampling.kv_cache import GrowingLayer
from minillm_cli.sampling.rollout import sample
from tests.helpers import left_pad

PAD, EOS, V, M = 0, 1, 6, 3  # pad ≠ eos; responses of at most M tokens over V ids


def _tiny(seed: int, vocab: int, scale: float) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random tiny models are near-uniform: sharpen them so p and q differ
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return _tiny(1, V, 40.0), _tiny(2, V, 40.0)


PROMPTS = [[2, 3], [4, 5, 3, 2, 5]]  # two prompt lengths, interleaved in every batch


def _next_target(student, teacher, prompt: list[int], prefixes: list[tuple[int, ...]], alpha: float,
                 temperature: float, top_k: int) -> dict[tuple[int, ...], torch.Tensor]:
    """p̃(· | prompt, prefix) (float64, (V,)) for every prefix, from one teacher-forced forward each."""
    out = {}
    for prefix in prefixes:
        ids = torch.tensor([prompt + list(prefix)])
        with torch.no_grad():
            lq = (student(ids).logits[0, -1].double() / temperature).log_softmax(-1)
            lp = teacher(ids).logits[0, -1, :V].double().log_softmax(-1)
        target = mixture.target(lq, lp, alpha, temperature, top_k, 1.0)
        out[prefix] = target.exp()
    return out


def exact_sequence_probs(student, teacher, prompt: list[int], alpha: float, temperature: float,
                         top_k: int) -> dict[tuple[int, ...], float]:
    """Probability under p̃ of every complete response: ends with EOS, or has M tokens."""
    prefixes = [p for n in range(M) for p in itertools.product([t for t in range(V) if t != EOS], repeat=n)]
    nxt = _next_target(student, teacher, prompt, prefixes, alpha, temperature, top_k)
    probs: dict[tuple[int, ...], float] = {}
    for prefix in prefixes:
        head = math.prod(float(nxt[prefix[:i]][t]) for i, t in enumerate(prefix))
        for t in range(V):
            if t == EOS or len(prefix) == M - 1:
                probs[prefix + (t,)] = head * float(nxt[prefix][t])
    assert abs(sum(probs.values()) - 1.0) < 1e-9
    return probs


def _chi_square_p(observed: dict[tuple[int, ...], int], expected_probs: dict[tuple[int, ...], float],
                  n: int) -> float:
    """p-value of Pearson's chi-square; cells expected below 5 are merged into one."""
    assert set(observed) <= {k for k, v in expected_probs.items() if v > 0}, "a sequence of probability 0 was drawn"
    stat, df, small_obs, small_exp = 0.0, -1, 0, 0.0
    for key, prob in expected_probs.items():
        e, o = prob * n, observed.get(key, 0)
        if e < 5:
            small_obs, small_exp = small_obs + o, small_exp + e
        else:
            stat, df = stat + (o - e) ** 2 / e, df + 1
    if small_exp > 0:
        stat, df = stat + (small_obs - small_exp) ** 2 / small_exp, df + 1
    assert df >= 10  # enough cells that the test has power
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _sample_counts(student, teacher, n_per_prompt: int, seed: int, **kw) -> tuple[list[dict], Rollout]:
    counts: list[dict] = [{} for _ in PROMPTS]
    gen = torch.Generator().manual_seed(seed)
    batch = 2000  # rows per call, the two prompts interleaved
    ids, mask = left_pad(PROMPTS * (batch // len(PROMPTS)), PAD)
    last = None
    for _ in range(n_per_prompt * len(PROMPTS) // batch):
        r = sample(student, ids, mask, teacher=teacher, max_new_tokens=M, eos_token_id=EOS, pad_token_id=PAD,
                   generator=gen, **kw)
        for i in range(r.response_ids.shape[0]):
            seq = tuple(r.response_ids[i, : int(r.response_mask[i].sum())].tolist())
            counts[i % len(PROMPTS)][seq] = counts[i % len(PROMPTS)].get(seq, 0) + 1
        last = r
    assert last is not None
    return counts, last


CASES = [  # (alpha, temperature, top_k, speculative_tokens)
    (0.5, 1.0, 0, 2),
    (0.2, 0.7, 0, 3),  # k > M − 1: the last round is cut to the budget
    (0.5, 1.0, 3, 1),  # a top-k cut target (not accepted by MiniLLM, still exact)
    (1.0, 1.0, 0, 2),  # the teacher alone
]


@pytest.mark.parametrize("alpha,temperature,top_k,k", CASES)
def test_sequences_follow_the_exact_mixture(pair, alpha: float, temperature: float, top_k: int, k: int) -> None:
    student, teacher = pair
    n = 20000
    kw = dict(alpha=alpha, temperature=temperature, top_k=top_k)
    counts, last = _sample_counts(student, teacher, n, seed=11, speculative_tokens=k, **kw)
    assert last.drafts_checked > last.drafts_accepted > 0  # drafts were both accepted and rejected
    for prompt, observed in zip(PROMPTS, counts):
        exact = exact_sequence_probs(student, teacher, prompt, alpha, temperature, top_k)
        assert sum(observed.values()) == n
        assert _chi_square_p(observed, exact, n) > 1e-3


def test_lockstep_passes_and_a_wrong_replacement_rule_fails(pair, monkeypatch) -> None:
    student, teacher = pair
    alpha, n = 0.5, 20000
    exact = [exact_sequence_probs(student, teacher, p, alpha, 1.0, 0) for p in PROMPTS]
    lockstep, _ = _sample_counts(student, teacher, n, seed=12, alpha=alpha)
    assert all(_chi_square_p(o, e, n) > 1e-3 for o, e in zip(lockstep, exact))
    # The classic mistake: after a rejection, draw the replacement from p̃ itself instead of the
    # normalised max(0, p̃ − q̃). Every token is still one p̃ could produce, but the sequences are biased.
    monkeypatch.setattr(speculative, "residual_probs", lambda log_target, log_draft: log_target.exp())
    wrong, _ = _sample_counts(student, teacher, n, seed=12, alpha=alpha, speculative_tokens=2)
    assert min(_chi_square_p(o, e, n) for o, e in zip(wrong, exact)) < 1e-6


def test_acceptance_rate_is_at_least_one_minus_alpha(pair) -> None:
    student, teacher = pair
    ids, mask = left_pad(PROMPTS * 500, PAD)
    for alpha in (0.2, 0.5):
        r = sample(student, ids, mask, teacher=teacher, alpha=alpha, max_new_tokens=M, eos_token_id=EOS,
                   pad_token_id=PAD, generator=torch.Generator().manual_seed(3), speculative_tokens=2)
        rate = r.drafts_accepted / r.drafts_checked
        assert 1 - alpha - 0.02 <= rate < 1.0, (alpha, rate)
        assert r.teacher_row_calls < r.response_mask.sum()  # fewer teacher calls than tokens


# --------------------------------------------------------------- recorded values, caches, rows
EOS_MANY = list(range(3, 320, 9))  # tests/tiny.py models: many EOS ids so that rows stop early
TINY_PAD = 0


def _sharp(models, scale: float = 12.0):
    out = []
    for m in models:
        m = copy.deepcopy(m).eval()
        with torch.no_grad():
            m.lm_head.weight.mul_(scale)
        out.append(m)
    return out


TINY_PROMPTS = [[5, 17, 40, 41], [8, 9, 10, 11, 12, 13, 60], [99], [7, 250, 33]] * 2


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_recorded_values_equal_a_teacher_forced_recomputation(models, temperature: float) -> None:
    student, teacher = _sharp(models)
    ids, mask = left_pad(TINY_PROMPTS, PAD)
    alpha = 0.3
    r = sample(student, ids, mask, teacher=teacher, alpha=alpha, max_new_tokens=14, eos_token_id=EOS_MANY,
               pad_token_id=TINY_PAD, temperature=temperature, generator=torch.Generator().manual_seed(5),
               keep_teacher_logprobs=True, speculative_tokens=4)
    assert r.drafts_checked > r.drafts_accepted  # rejections happened, so holes were exercised
    assert r.response_mask.sum() > 3 * len(TINY_PROMPTS)
    m = r.response_mask.bool()
    ii, am, pos = concat_prompt_response(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        zq = student(input_ids=ii, attention_mask=am, position_ids=pos).logits[:, P - 1 : -1].float()
        zp = teacher(input_ids=ii, attention_mask=am, position_ids=pos).logits[:, P - 1 : -1].float()
    lq = (zq / temperature).log_softmax(-1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    lp_full = zp.log_softmax(-1)
    lp = lp_full.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(r.logq[m], lq[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logp[m], lp[m], atol=1e-4, rtol=0)
    mix = torch.logaddexp(r.logq + math.log(1 - alpha), (zp / temperature).log_softmax(-1).gather(
        -1, r.response_ids.unsqueeze(-1)).squeeze(-1) + math.log(alpha))
    torch.testing.assert_close(r.log_mix[m], mix[m], atol=1e-4, rtol=0)
    assert r.teacher_logprobs is not None
    torch.testing.assert_close(r.teacher_logprobs[m], lp_full[m], atol=1e-4, rtol=0)
    for x in (r.logq, r.logp, r.log_mix):
        assert x[~m].eq(0).all()
    # pad ≠ eos: every row ends at its first EOS (or the budget), pad after it.
    for i in range(r.response_ids.shape[0]):
        n = int(r.response_mask[i].sum())
        eos_at = [j for j in range(n) if int(r.response_ids[i, j]) in EOS_MANY]
        assert eos_at in ([], [n - 1]) and (eos_at or n == 14 or n == r.response_ids.shape[1])
        assert r.response_ids[i, n:].eq(TINY_PAD).all()


def test_rows_advance_at_their_own_pace(models, monkeypatch) -> None:
    # The verification masks record each row's accepted prefix: after a round, different rows have
    # different numbers of valid columns (rows are not cut back to the slowest one).
    student, teacher = _sharp(models)
    masks: list[torch.Tensor] = []
    step_all = CachedLM.step_all

    def spy(self, input_ids, attention_mask, position_ids):
        masks.append(attention_mask.clone())
        return step_all(self, input_ids, attention_mask, position_ids)

    monkeypatch.setattr(CachedLM, "step_all", spy)
    ids, mask = left_pad(TINY_PROMPTS, PAD)
    r = sample(student, ids, mask, teacher=teacher, alpha=0.5, max_new_tokens=12, eos_token_id=[319],
               pad_token_id=TINY_PAD, generator=torch.Generator().manual_seed(6), speculative_tokens=4)
    assert len(masks) >= 3
    P = ids.shape[1]
    first_round = masks[1][:, P : P + 4].sum(-1)  # (B,) valid columns of round 1, seen by round 2
    assert first_round.unique().numel() > 1, first_round
    # Rows reach the 12-token budget in different rounds: the last rounds run on fewer rows.
    assert r.response_mask.sum(-1).eq(12).all()
    assert masks[-1].shape[0] < len(TINY_PROMPTS)


@pytest.mark.parametrize("k", [0, 3])
def test_finished_rows_are_dropped_and_the_rest_stay_exact(models, monkeypatch, k: int) -> None:
    student, teacher = _sharp(models)
    kept: list[int] = []
    keep_rows = CachedLM.keep_rows

    def spy(self, index):
        kept.append(index.numel())
        return keep_rows(self, index)

    monkeypatch.setattr(CachedLM, "keep_rows", spy)
    ids, mask = left_pad(TINY_PROMPTS, PAD)
    r = sample(student, ids, mask, teacher=teacher, alpha=0.3, max_new_tokens=20, eos_token_id=EOS_MANY,
               pad_token_id=TINY_PAD, generator=torch.Generator().manual_seed(9), speculative_tokens=k)
    lengths = r.response_mask.sum(-1)
    assert kept and min(kept) < len(TINY_PROMPTS) and lengths.unique().numel() > 2  # rows left at different times
    with torch.no_grad():
        sq = score(student, ids, mask, r.response_ids, r.response_mask)
        sp = score(teacher, ids, mask, r.response_ids, r.response_mask)
    torch.testing.assert_close(r.logq, sq, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logp, sp, atol=1e-4, rtol=0)
    if k == 0:  # lockstep: one teacher call per generated token
        assert r.teacher_row_calls == int(lengths.sum())
    else:
        assert r.teacher_row_calls < int(lengths.sum())


@pytest.mark.parametrize("spare", [0, 1, 16])
def test_cache_with_holes_equals_a_fresh_forward(models, spare: int) -> None:
    # Feed 3 tokens, hide the last 2 (a rejection after the first), feed a replacement: the logits
    # must equal a fresh forward over the accepted prefix + the replacement. spare 0: transformers'
    # own cache layers; 1: in-place layers that must grow at the 3-column feed; 16: in-place, no growth.
    _, teacher = models
    lm = CachedLM(teacher, torch.device("cpu"), spare_columns=spare)
    ids, mask = left_pad([[5, 17, 40, 41], [99]], PAD)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lm.step(ids, mask, pos)
    assert all(isinstance(layer, GrowingLayer) == (spare > 0) for layer in lm.cache.layers)
    n = mask.sum(-1)
    drafts = torch.tensor([[7, 8, 9], [10, 11, 12]])
    ones = torch.ones(2, 3, dtype=torch.long)
    lm.step_all(drafts, torch.cat([mask, ones], 1), n.unsqueeze(-1) + torch.arange(3))
    kept = torch.tensor([[1, 0, 0], [1, 1, 0]])  # row 0 keeps 1 column, row 1 keeps 2
    new = torch.tensor([[30], [31]])
    got = lm.step(new, torch.cat([mask, kept, torch.ones(2, 1, dtype=torch.long)], 1),
                  (n + kept.sum(-1)).unsqueeze(-1))
    for b, (prompt, keep) in enumerate([([5, 17, 40, 41], 1), ([99], 2)]):
        seq = torch.tensor([prompt + drafts[b, :keep].tolist() + [int(new[b])]])
        with torch.no_grad():
            fresh = teacher(seq).logits[0, -1].float().log_softmax(-1)
        torch.testing.assert_close(got[b], fresh, atol=1e-4, rtol=0)


def test_a_wider_teacher_head_and_reproducibility(models, wide_teachers) -> None:
    student, _ = models
    ids, mask = left_pad(TINY_PROMPTS, PAD)
    for teacher in wide_teachers:
        kw = dict(teacher=teacher, alpha=0.4, max_new_tokens=10, eos_token_id=EOS_MANY, pad_token_id=TINY_PAD,
                  speculative_tokens=3, keep_teacher_logprobs=True)
        a = sample(student, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
        b = sample(student, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logq, b.logq)
        V_s = student.config.vocab_size
        assert a.teacher_logprobs is not None and a.teacher_logprobs.shape[-1] == V_s
        assert int(a.response_ids.max()) < V_s
        with torch.no_grad():
            sp = score(teacher, ids, mask, a.response_ids, a.response_mask, vocab_size=V_s)
        torch.testing.assert_close(a.logp, sp, atol=1e-4, rtol=0)


def test_bad_speculative_tokens(models) -> None:
    student, teacher = models
    ids, mask = left_pad(TINY_PROMPTS, PAD)
    with pytest.raises(ValueError, match="speculative_tokens"):
        sample(student, ids, mask, teacher=teacher, alpha=0.2, max_new_tokens=3, eos_token_id=EOS_MANY,
               pad_token_id=TINY_PAD, speculative_tokens=-1)
