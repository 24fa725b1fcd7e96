"""How MiniLLM rewards stopping (issue 31): the EOS token's reward, mask, return and single-step term on
a finished response, a response cut at `method.max_new_tokens`, and a teacher-mixed one, each pinned
against values worked out by hand (docs/algorithm.md §2-4, bench/QUALITY.md "Length drift").

What a truncated rollout contributes: its M tokens are all valid, none is EOS, and its last token's
return is its own reward alone — the same as if that token had been an EOS with that reward. Nothing
stands for the continuation the cut hides, and no stop decision is trained at any of its positions
(as in the reference code, which treats a row at its length limit as ended).
"""

from __future__ import annotations

import math

import pytest
import torch

from minillm_cli.losses import divergences
from minillm_cli.losses.policy_gradient import advantages, policy_loss
from tests.helpers import left_pad

GAMMA = 0.95


def adv(rewards: list[list[float]], mask: list[list[int]], **kw: object) -> torch.Tensor:
    settings = {"gamma": GAMMA, "include_current": True, "length_norm": True, "whiten": False, **kw}
    return advantages(torch.tensor(rewards), torch.tensor(mask), **settings)  # type: ignore[arg-type]


def test_a_finished_response_eos_return_is_its_own_reward() -> None:
    # [y1, y2, EOS] with rewards [-1, -0.5, -2], then padding
    r, m = [[-1.0, -0.5, -2.0, 7.0]], [[1, 1, 1, 0]]  # the padded reward (7) must not leak
    g = [-1 + GAMMA * (-0.5 + GAMMA * -2), -0.5 + GAMMA * -2, -2.0]  # -3.28, -2.4, -2.0
    assert adv(r, m, length_norm=False)[0].tolist() == pytest.approx([*g, 0.0])
    assert adv(r, m)[0].tolist() == pytest.approx([g[0] / 3, g[1] / 2, g[2] / 1, 0.0])  # -1.093333, -1.2, -2
    # the paper's return (future rewards only): the EOS gets 0, the tokens before it the mean of what follows
    assert adv(r, m, include_current=False)[0].tolist() == pytest.approx([GAMMA * g[1] / 2, GAMMA * -2.0, 0.0, 0.0])


def test_a_truncated_response_is_scored_as_if_it_had_ended() -> None:
    cut = adv([[-0.5] * 4], [[1, 1, 1, 1]])[0]
    expected = [(1 - GAMMA ** (4 - t)) / (1 - GAMMA) * -0.5 / (4 - t) for t in range(4)]
    assert cut.tolist() == pytest.approx(expected)  # -0.463734, -0.475417, -0.4875, -0.5
    assert cut.tolist() == pytest.approx([-0.463734, -0.475417, -0.4875, -0.5], abs=1e-6)
    # identical to the same row whose last token was an EOS of the same reward: the cut is not priced
    assert torch.equal(cut, adv([[-0.5] * 4 + [0.0]], [[1, 1, 1, 1, 0]])[0][:4])


def test_whitening_over_a_buffer_of_finished_truncated_and_eos_only_rows() -> None:
    r = [[-1.0, -0.5, -2.0, 0.0], [-0.5, -0.5, -0.5, -0.5], [-2.0, 0.0, 0.0, 0.0]]
    m = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    a = advantages(torch.tensor(r), torch.tensor(m), gamma=GAMMA, length_norm=True)  # the paper's normalisation
    raw = adv(r, m)
    valid = torch.tensor(m).bool()
    mean, std = raw[valid].double().mean(), raw[valid].double().std(unbiased=False)
    assert float(mean) == pytest.approx(-1.027498, abs=1e-6) and float(std) == pytest.approx(0.624308, abs=1e-6)
    assert a[0, :3].tolist() == pytest.approx([-0.10545, -0.27631, -1.55773], abs=1e-5)
    assert a[1].tolist() == pytest.approx([0.90302, 0.88431, 0.86495, 0.84493], abs=1e-5)
    assert a[2, 0].item() == pytest.approx(-1.55773, abs=1e-5)


def test_a_teacher_mixed_eos_carries_its_importance_weight_and_clip() -> None:
    # alpha 0.2; q_old = [0.5, 0.6, 0.1], p = [0.3, 0.6, 0.6] for [y1, y2, EOS]
    alpha = 0.2
    q, p = torch.tensor([[0.5, 0.6, 0.1]]), torch.tensor([[0.3, 0.6, 0.6]])
    mix = (1 - alpha) * q + alpha * p
    assert mix[0].tolist() == pytest.approx([0.46, 0.6, 0.2])
    log_w = q.log() - mix.log()
    assert log_w.exp()[0].tolist() == pytest.approx([1.086957, 1.0, 0.5], abs=1e-6)
    reward = p.log() - q.log()  # the EOS is rewarded by the teacher's own EOS probability
    assert reward[0].tolist() == pytest.approx([-0.510826, 0.0, 1.791759], abs=1e-6)
    mask = torch.ones(1, 3)
    a = advantages(reward, mask, gamma=GAMMA, length_norm=True, whiten=False)  # the paper's normalisation
    r0, r1, r2 = reward[0].tolist()
    expected = [(r0 + GAMMA * r1 + GAMMA**2 * r2) / 3, (r1 + GAMMA * r2) / 2, r2]
    assert a[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.368750, 0.851088, 1.791759], abs=1e-5)
    logq = q.log().requires_grad_()
    loss, clipped = policy_loss(logq, q.log(), log_w, a, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad((loss * mask).sum(), logq)
    assert grad[0].tolist() == pytest.approx([-0.400815, -0.851088, -0.895880], abs=1e-5)  # -A·ρ at ρ = w
    assert float(clipped) == 0.0
    # an EOS the teacher pushed in (w = 0.5 < 1 - eps) with a negative advantage: clipped, no gradient
    bad = torch.tensor([[0.0, 0.0, -1.0]])
    loss, clipped = policy_loss(logq, q.log(), log_w, bad, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad((loss * mask).sum(), logq)
    assert grad[0, 2].item() == 0.0 and float(clipped) > 0


def test_the_single_step_term_trains_the_eos_probability() -> None:
    # two ids {EOS, other}: q = (0.1, 0.9), p = (0.6, 0.4) at the EOS position
    z = torch.tensor([[[math.log(0.1), math.log(0.9)]]], requires_grad=True)  # (1, 1, 2) student logits
    teacher = torch.tensor([[[math.log(0.6), math.log(0.4)]]])
    kl = divergences.reverse_kl(z, teacher, torch.ones(1, 1))
    assert kl.item() == pytest.approx(0.550661, abs=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    assert grad[0, 0, 0].item() == pytest.approx(-0.234242, abs=1e-6)  # raising q(EOS) lowers the KL


def test_the_sampler_masks_up_to_and_including_the_first_eos_and_cuts_at_the_budget() -> None:
    from minillm_cli.sampling.rollout import sample
    from tests.helpers import PrefixTableLM

    eos, pad = 3, 0
    lm = PrefixTableLM([()], vocab=4, seed=0, scale=0.0)  # one row for every prefix: p(EOS) = 0.3
    with torch.no_grad():
        lm.table.copy_(torch.tensor([0.7 / 3, 0.7 / 3, 0.7 / 3, 0.3]).log().expand_as(lm.table))
    ids, mask = left_pad([[1, 2, 1], [2], [1, 1]] * 8, pad)
    out = sample(lm, ids, mask, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad,
                 generator=torch.Generator().manual_seed(0))
    finished = cut = 0
    for row, m in zip(out.response_ids.tolist(), out.response_mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        if eos in row[:n]:
            assert row.index(eos) == n - 1  # the EOS is the last valid token
            finished += 1
        else:
            assert n == 4  # no EOS: cut at the budget, every token valid
            cut += 1
    assert finished and cut


def test_the_discounted_normalisation_prices_stopping_like_continuing() -> None:
    """With the count as divisor and γ < 1, a constant reward r < 0 gives a token that opens k more
    tokens the advantage r·(1 − γ^(k+1))/((1 − γ)(k + 1)): less negative the longer the future, so every
    continuation is credited over a stop. The discounted normalisation gives r whatever the length."""
    r = -1.0
    stop = adv([[r]], [[1]])[0, 0].item()
    for k in (1, 5, 20, 60):
        go = adv([[r] * (k + 1)], [[1] * (k + 1)])[0, 0].item()
        assert go > stop + 0.02  # count normalisation: continuing looks better
        fixed = adv([[r] * (k + 1)], [[1] * (k + 1)], discounted_norm=True)[0, 0].item()
        assert fixed == pytest.approx(stop)
    # γ = 1: both normalisations are the plain mean
    rewards, mask = [[-1.0, -0.2, -3.0]], [[1, 1, 1]]
    assert torch.allclose(adv(rewards, mask, gamma=1.0), adv(rewards, mask, gamma=1.0, discounted_norm=True))
