"""Tests of the KV-cached teacher-mixed sampler (`minillm_cli.rollout`).

The cached decoding loop is checked against an independent teacher-forced forward (`score`, and full
distributions built from one forward over prompt + response), so a wrong position id, mask or cache
update shows up as a log-prob mismatch.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minillm_cli.sampling.batch import Rollout, concat_prompt_response, score
from minillm_cli.sampling.cached_lm import CachedLM
from minillm_cli.sampling.rollout import sample
from tests.helpers import left_pad

PAD = 0  # <|endoftext|>: deliberately not the EOS, so nothing relies on pad == eos
# Many "EOS" ids so that random tiny models stop early and the masks get exercised.
EOS_MANY = list(range(3, 320, 9))


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tiny_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    return _load(tiny_dir / "student"), _load(tiny_dir / "teacher")


@pytest.fixture(scope="module")
def sharp_models(models: tuple[torch.nn.Module, torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies with scaled output heads: random tiny models are near-uniform, which would make the
    sampling-distribution tests unable to tell the student from the teacher."""
    out = []
    for m in models:
        m = copy.deepcopy(m)
        with torch.no_grad():
            m.lm_head.weight.mul_(12.0)
        out.append(m)
    return out[0], out[1]


PROMPTS = [[5, 17, 40, 41], [8, 9, 10, 11, 12, 13, 60], [99], [7, 250, 33]]


def _full_logprobs(model: torch.nn.Module, r: Rollout, vocab: int) -> torch.Tensor:
    """(B, T, vocab) next-token log-probs at every response position, by one teacher-forced forward."""
    input_ids, attention_mask, position_ids = concat_prompt_response(
        r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask
    )
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, P - 1 : -1, :vocab].float().log_softmax(-1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_concat_layout() -> None:
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8]], PAD)
    response_ids = torch.tensor([[1, 2, 3], [4, 5, PAD]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, mask, pos = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    assert ids.tolist() == [[5, 6, 7, 1, 2, 3], [PAD, PAD, 8, 4, 5, PAD]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 2]]


def test_cached_logprobs_match_teacher_forced_score(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    alpha = 0.3
    r = sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=alpha, max_new_tokens=10,
               eos_token_id=EOS_MANY, pad_token_id=PAD, generator=_gen(0))
    B, T = r.response_ids.shape
    assert B == 4 and 1 <= T <= 10
    assert r.response_mask.sum() > B  # several real tokens were scored
    with torch.no_grad():
        sq = score(student, prompt_ids, prompt_mask, r.response_ids, r.response_mask)
        sp = score(teacher, prompt_ids, prompt_mask, r.response_ids, r.response_mask)
    torch.testing.assert_close(r.logq, sq, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logp, sp, atol=1e-4, rtol=0)
    mix = torch.log((1 - alpha) * r.logq.exp() + alpha * r.logp.exp()) * r.response_mask
    torch.testing.assert_close(r.log_mix, mix, atol=1e-5, rtol=0)
    assert (r.logq[r.response_mask.bool()] < 0).all()


def test_masks_and_padding_after_eos(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS * 4, PAD)
    r = sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=0.5, max_new_tokens=30,
               eos_token_id=EOS_MANY, pad_token_id=PAD, generator=_gen(1))
    is_eos = torch.isin(r.response_ids, torch.tensor(EOS_MANY)) & r.response_mask.bool()
    assert is_eos.any(dim=1).sum() >= 8  # most sequences stopped, so the test has teeth
    for i in range(r.response_ids.shape[0]):
        hits = is_eos[i].nonzero().flatten()
        end = int(hits[0]) + 1 if len(hits) else r.response_ids.shape[1]
        assert r.response_mask[i, :end].eq(1).all() and r.response_mask[i, end:].eq(0).all()
        assert r.response_ids[i, end:].eq(PAD).all()
        for x in (r.logq, r.logp, r.log_mix):
            assert x[i, end:].eq(0).all() and (x[i, :end] < 0).all()
    # Decoding stopped as soon as every sequence had ended.
    assert r.response_mask[:, -1].any()
    if r.response_ids.shape[1] < 30:
        assert is_eos.any(dim=1).all()


def test_early_stop_shortens_the_rollout(models) -> None:
    student, _ = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    every_id_but_one = list(range(1, 320))
    r = sample(student, prompt_ids, prompt_mask, max_new_tokens=50, eos_token_id=every_id_but_one,
               pad_token_id=PAD, generator=_gen(2))
    assert r.response_ids.shape[1] < 5
    assert r.logp is None
    torch.testing.assert_close(r.log_mix, r.logq)


def test_padded_batch_equals_each_example_alone(models) -> None:
    student, teacher = models
    # Extra left padding beyond the longest prompt must not change anything either.
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD, width=10)
    kw = dict(teacher=teacher, alpha=0.5, max_new_tokens=8, eos_token_id=EOS_MANY, pad_token_id=PAD, top_k=1)
    batch = sample(student, prompt_ids, prompt_mask, **kw)
    for i, p in enumerate(PROMPTS):
        alone = sample(student, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), **kw)
        T = alone.response_ids.shape[1]
        assert batch.response_ids[i, :T].tolist() == alone.response_ids[0].tolist()
        assert batch.response_mask[i, T:].eq(0).all()
        torch.testing.assert_close(batch.logq[i, :T], alone.logq[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.logp[i, :T], alone.logp[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_top_k_1_is_greedy_argmax_of_the_mixture(models, alpha: float) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    r = sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=alpha, max_new_tokens=8,
               eos_token_id=EOS_MANY, pad_token_id=PAD, top_k=1, generator=_gen(3))
    V = student.config.vocab_size
    mix = alpha * _full_logprobs(teacher, r, V).exp() + (1 - alpha) * _full_logprobs(student, r, V).exp()
    valid = r.response_mask.bool()
    assert r.response_ids[valid].tolist() == mix.argmax(-1)[valid].tolist()


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square of `samples` against `probs`, bins with expected count < 5 lumped together."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` restricted to the smallest set of most likely ids whose mass reaches `top_p`, renormalised."""
    if top_p >= 1.0:
        return probs
    values, order = probs.sort(descending=True)
    size = int((values.cumsum(0) < top_p).sum()) + 1
    kept = torch.zeros_like(probs)
    kept[order[:size]] = probs[order[:size]]
    return kept / kept.sum()


@pytest.mark.parametrize(
    "alpha,temperature,top_p", [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (0.5, 1.0, 1.0), (0.5, 0.5, 1.0), (0.5, 1.0, 0.3)]
)
def test_first_token_follows_the_tempered_mixture(sharp_models, alpha: float, temperature: float, top_p: float) -> None:
    # Temperature divides each model's logits before mixing (the reference's convention), top-p cuts
    # the mixture; what is recorded is exactly what was sampled from.
    student, teacher = sharp_models
    prompt = torch.tensor([[5, 17, 40, 41]])
    n = 20000
    r = sample(student, prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long), teacher=teacher, alpha=alpha,
               max_new_tokens=1, eos_token_id=EOS_MANY, pad_token_id=PAD, temperature=temperature, top_p=top_p,
               generator=_gen(4))
    with torch.no_grad():
        z_q, z_p = student(prompt).logits[0, -1], teacher(prompt).logits[0, -1]
    q, p = z_q.softmax(-1), z_p.softmax(-1)
    q_t, p_t = (z_q / temperature).softmax(-1), (z_p / temperature).softmax(-1)
    mix = alpha * p + (1 - alpha) * q
    target = _nucleus(alpha * p_t + (1 - alpha) * q_t, top_p)
    assert (target > 0).sum() >= 5  # a nucleus of several ids, so the filter is really tested
    stat, df = _chi_square(r.response_ids[:, 0], target)
    # Far tail of chi-square(df): mean df, sd sqrt(2 df).
    assert df >= 3 and stat < df + 6 * math.sqrt(2 * df), (stat, df)
    # The test can tell distributions apart: the other endpoint, the untempered or unfiltered
    # mixture, or the tempered mixture p~^(1/T) (the previous convention) is rejected.
    tempered_mix = mix ** (1 / temperature) / (mix ** (1 / temperature)).sum()
    other = {(1.0, 1.0, 1.0): q, (0.0, 1.0, 1.0): p, (0.5, 1.0, 1.0): q, (0.5, 0.5, 1.0): mix,
             (0.5, 1.0, 0.3): mix}[(alpha, temperature, top_p)]
    for wrong_dist in [other] + ([tempered_mix] if temperature != 1.0 else []):
        wrong, wrong_df = _chi_square(r.response_ids[:, 0], wrong_dist)
        assert wrong > wrong_df + 30 * math.sqrt(2 * wrong_df), (wrong, wrong_df)
    # Recorded: the tempered student, the teacher itself, and the distribution actually sampled.
    tok = r.response_ids[:, 0]
    torch.testing.assert_close(r.logq[:, 0], q_t.log()[tok], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logp[:, 0], p.log()[tok], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.log_mix[:, 0], target.log()[tok], atol=1e-4, rtol=0)


def test_reproducible_with_the_same_seed(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    kw = dict(teacher=teacher, alpha=0.2, max_new_tokens=12, eos_token_id=EOS_MANY, pad_token_id=PAD)
    a = sample(student, prompt_ids, prompt_mask, generator=_gen(7), **kw)
    b = sample(student, prompt_ids, prompt_mask, generator=_gen(7), **kw)
    c = sample(student, prompt_ids, prompt_mask, generator=_gen(8), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logq, b.logq)
    assert not torch.equal(a.response_ids, c.response_ids)
    # Resuming from a saved generator state continues the same stream.
    g = _gen(9)
    sample(student, prompt_ids, prompt_mask, generator=g, **kw)
    state = g.get_state()
    d = sample(student, prompt_ids, prompt_mask, generator=g, **kw)
    e = sample(student, prompt_ids, prompt_mask, generator=torch.Generator().set_state(state), **kw)
    assert torch.equal(d.response_ids, e.response_ids)


def test_top_k_top_p_temperature_filter_without_nan(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS * 3, PAD)
    alpha, temperature = 0.3, 0.7
    r = sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=alpha, max_new_tokens=10,
               eos_token_id=EOS_MANY, pad_token_id=PAD, temperature=temperature, top_k=3, top_p=0.5,
               generator=_gen(5))
    for x in (r.logq, r.logp, r.log_mix):
        assert torch.isfinite(x).all()
    V = student.config.vocab_size
    q_t = (_full_logprobs(student, r, V) / temperature).softmax(-1)
    p, p_t = _full_logprobs(teacher, r, V).exp(), (_full_logprobs(teacher, r, V) / temperature).softmax(-1)
    mix = alpha * p_t + (1 - alpha) * q_t  # (B, T, V) mixture of the tempered models
    chosen = mix.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    rank = (mix > chosen.unsqueeze(-1)).sum(-1)  # 0 = most likely id
    valid = r.response_mask.bool()
    assert (rank[valid] < 3).all()
    take = lambda dist: dist.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1).log() * r.response_mask  # noqa: E731
    torch.testing.assert_close(r.logq, take(q_t), atol=1e-4, rtol=0)  # tempered student
    torch.testing.assert_close(r.logp, take(p), atol=1e-4, rtol=0)  # the teacher itself
    # log_mix is the drawn token's probability after the cut: at least its uncut mixture probability.
    assert (r.log_mix[valid] >= chosen.log()[valid] - 1e-5).all() and (r.log_mix[valid] <= 1e-6).all()


def test_top_k_log_mix_is_the_renormalised_cut_mixture(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS * 2, PAD)
    alpha = 0.4
    r = sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=alpha, max_new_tokens=6,
               eos_token_id=EOS_MANY, pad_token_id=PAD, top_k=3, generator=_gen(11))
    V = student.config.vocab_size
    mix = alpha * _full_logprobs(teacher, r, V).exp() + (1 - alpha) * _full_logprobs(student, r, V).exp()
    kept = mix.topk(3, dim=-1).values.sum(-1)  # (B, T) mass of the kept ids
    chosen = mix.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(r.log_mix, (chosen / kept).log() * r.response_mask, atol=1e-4, rtol=0)


def test_student_mode_is_restored(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    student.train()
    try:
        sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=0.2, max_new_tokens=3,
               eos_token_id=EOS_MANY, pad_token_id=PAD, generator=_gen(6))
        assert student.training
    finally:
        student.eval()
    sample(student, prompt_ids, prompt_mask, max_new_tokens=2, eos_token_id=EOS_MANY, pad_token_id=PAD)
    assert not student.training


def test_bad_settings_raise(models) -> None:
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    kw = dict(max_new_tokens=2, eos_token_id=EOS_MANY, pad_token_id=PAD)
    with pytest.raises(ValueError, match="teacher"):
        sample(student, prompt_ids, prompt_mask, alpha=0.2, **kw)
    with pytest.raises(ValueError, match="temperature"):
        sample(student, prompt_ids, prompt_mask, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="alpha"):
        sample(student, prompt_ids, prompt_mask, teacher=teacher, alpha=1.5, **kw)


def test_wider_teacher_is_sliced_to_the_student_ids(models, wide_teachers) -> None:
    student, _ = models
    wide, narrow = wide_teachers
    V = student.config.vocab_size
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    kw = dict(alpha=0.5, max_new_tokens=10, eos_token_id=EOS_MANY, pad_token_id=PAD)
    a = sample(student, prompt_ids, prompt_mask, teacher=wide, generator=_gen(10), **kw)
    b = sample(student, prompt_ids, prompt_mask, teacher=narrow, generator=_gen(10), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=0)
    with torch.no_grad():
        sliced = score(wide, prompt_ids, prompt_mask, a.response_ids, a.response_mask, vocab_size=V)
        full = score(wide, prompt_ids, prompt_mask, a.response_ids, a.response_mask)
    torch.testing.assert_close(a.logp, sliced, atol=1e-4, rtol=0)
    assert not torch.allclose(a.logp, full, atol=1e-4)  # the padding rows really carried mass
    # A student wider than its teacher is refused.
    with pytest.raises(ValueError, match="narrower"):
        sample(wide, prompt_ids, prompt_mask, teacher=student, **kw)


def test_dropping_finished_rows_changes_no_draw(models, monkeypatch) -> None:
    # The lockstep loop drops rows that emitted EOS from the caches; every row keeps its own uniform
    # of the whole batch's stream, so the samples are those of the loop that keeps every row.
    student, teacher = models
    prompt_ids, prompt_mask = left_pad(PROMPTS * 3, PAD)
    kw = dict(teacher=teacher, alpha=0.3, max_new_tokens=20, eos_token_id=EOS_MANY, pad_token_id=PAD)
    dropped = sample(student, prompt_ids, prompt_mask, generator=_gen(21), **kw)
    monkeypatch.setattr(CachedLM, "can_drop_rows", lambda self: False)
    kept = sample(student, prompt_ids, prompt_mask, generator=_gen(21), **kw)
    assert dropped.response_mask.sum(-1).unique().numel() > 2  # rows ended at different steps
    assert torch.equal(dropped.response_ids, kept.response_ids)
    assert torch.equal(dropped.response_mask, kept.response_mask)
    torch.testing.assert_close(dropped.logq, kept.logq, atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped.logp, kept.logp, atol=1e-5, rtol=0)
