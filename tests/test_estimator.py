"""The policy-gradient estimator built from `minillm_cli.losses` against the EXACT gradient of KL[q‖p].

Tiny setting (docs/algorithm.md §3): vocabulary V = 3, fixed response length T = 3 and no EOS (every
sequence has exactly three valid tokens, so token sums and token means differ by a constant factor
and the enumeration covers all 3^3 = 27 sequences). The student is a free table of next-token
logits, one row per prefix (1 + 3 + 9 = 13 prefixes, all lengths 0..2), so every prefix has its own
distribution; the teacher is a fixed random table of the same shape.

(1) Exact: KL[q‖p] = Σ_y q(y) log(q(y)/p(y)) over the 27 sequences, differentiated by autograd.
(2) Estimate: N rollouts y ~ q (vectorised, seeded), rewards r_t = log p(y_t|·) − log q(y_t|·)
    (constants), `advantages(gamma=1, length_norm=False, whiten=False)`, `policy_loss(clip_eps=None)`
    with log_w = 0 (α = 0) and logq_old = logq_new.detach() (ρ = 1, ∇ρ = ∇log q), optionally plus the
    single-step term `reverse_kl`; per sequence the SUM over its tokens, then the mean over sequences.

(The training loop divides both the policy and the single-step sums by the same token count, which
for fixed-length sequences is this per-sequence sum up to a constant factor.)

Per-sample gradients give the standard error of every component, so "matches" means max |z| < 5
over all 39 components (and a small relative error of the whole vector).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from minillm_cli.losses import divergences, logprobs, policy_gradient

V, T = 3, 3
OFFSETS = [(V**t - 1) // (V - 1) for t in range(T)]  # first table row of the prefixes of length t: 0, 1, 4
NUM_PREFIXES = (V**T - 1) // (V - 1)  # 13
N_SAMPLES = 100_000


def prefix_index(y: Tensor) -> Tensor:
    """(N, T) sequences -> (N, T) table row of the prefix y_<t that predicts y_t."""
    idx = torch.zeros_like(y)
    code = torch.zeros(y.shape[0], dtype=torch.long)  # base-V number of the prefix so far
    for t in range(T):
        idx[:, t] = OFFSETS[t] + code
        code = code * V + y[:, t]
    return idx


def all_sequences() -> Tensor:
    """(V^T, T) every sequence of the tiny vocabulary."""
    return torch.cartesian_prod(*[torch.arange(V)] * T)


def seq_logprob(table: Tensor, y: Tensor) -> Tensor:
    """(N,) log-probability of whole sequences under a prefix table (plain torch, independent of losses.py)."""
    logits = table[prefix_index(y)]  # (N, T, V)
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(-1)


def sample(student: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """(n, T) sequences drawn token by token from the student table."""
    y = torch.zeros(n, T, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            probs = torch.softmax(student[OFFSETS[t] + code], -1)  # (n, V)
            y[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            code = code * V + y[:, t]
    return y


def exact_gradient(student: Tensor, teacher: Tensor) -> Tensor:
    """(13, V) ∇_θ KL[q_θ‖p] by enumerating every sequence."""
    ys = all_sequences()
    logq, logp = seq_logprob(student, ys), seq_logprob(teacher, ys)  # (27,) each
    kl = (logq.exp() * (logq - logp)).sum()
    (grad,) = torch.autograd.grad(kl, student)
    return grad


def single_step_bias(student: Tensor, teacher: Tensor) -> Tensor:
    """(13, V) E_q[Σ_t ∇KL(q(·|y_<t) ‖ p(·|y_<t))], gradient through the per-step KL only (prefix weights fixed).

    This is what the reference defaults add on top of the unbiased include_current=True estimator:
    the current token's term counted a second time.
    """
    ys = all_sequences()
    weight = seq_logprob(student, ys).exp().detach()  # (27,) q(y), a constant
    idx = prefix_index(ys)
    log_q, log_p = torch.log_softmax(student[idx], -1), torch.log_softmax(teacher[idx], -1)  # (27, T, V)
    step_kl = (log_q.exp() * (log_q - log_p)).sum(-1).sum(-1)  # (27,) Σ_t KL_t
    (grad,) = torch.autograd.grad((weight * step_kl).sum(), student)
    return grad


def per_sample_gradients(student: Tensor, teacher: Tensor, y: Tensor, *, include_current: bool,
                         single_step: bool) -> Tensor:
    """(N, 13, V) gradient of each rollout's loss (sum over its tokens) w.r.t. the student table."""
    idx = prefix_index(y)  # (N, T)
    s_logits = student.detach()[idx].requires_grad_()  # (N, T, V): a leaf, so its grad is per sample
    t_logits = teacher[idx]  # (N, T, V)
    mask = torch.ones(y.shape, dtype=torch.long)
    logq = logprobs.token_logprobs(s_logits, y, mask)  # (N, T)
    logp = logprobs.token_logprobs(t_logits, y, mask)
    rewards = (logp - logq).detach()
    adv = policy_gradient.advantages(rewards, mask, gamma=1.0, include_current=include_current, length_norm=False,
                            whiten=False)
    pg, _ = policy_gradient.policy_loss(logq, logq.detach(), torch.zeros_like(logq), adv, mask, clip_eps=None)
    per_seq = pg.sum(-1)  # (N,) sum over tokens, not token mean
    if single_step:
        per_seq = per_seq + divergences.reverse_kl(s_logits, t_logits, mask).sum(-1)
    (g_logits,) = torch.autograd.grad(per_seq.sum(), s_logits)  # (N, T, V), row n only from sample n
    out = torch.zeros(y.shape[0], NUM_PREFIXES, V)
    return out.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, V), g_logits)


@pytest.fixture(scope="module")
def setting() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    student = torch.randn(NUM_PREFIXES, V, generator=gen).requires_grad_()
    teacher = 1.5 * torch.randn(NUM_PREFIXES, V, generator=gen)
    y = sample(student, N_SAMPLES, gen)
    return {"student": student, "teacher": teacher, "y": y, "exact": exact_gradient(student, teacher)}


_CACHE: dict[tuple[bool, bool], Tensor] = {}


def estimate(setting: dict[str, Tensor], *, include_current: bool, single_step: bool) -> Tensor:
    """Per-sample gradients of one estimator setting on the shared rollouts, computed once per module."""
    key = (include_current, single_step)
    if key not in _CACHE:
        _CACHE[key] = per_sample_gradients(setting["student"], setting["teacher"], setting["y"],
                                           include_current=include_current, single_step=single_step)
    return _CACHE[key]


def z_scores(per_sample: Tensor, expected: Tensor) -> Tensor:
    """(13, V) (mean − expected) / standard error of the mean."""
    se = per_sample.std(0) / math.sqrt(per_sample.shape[0])
    assert bool((se > 0).all())
    return (per_sample.mean(0) - expected) / se


def rel_err(value: Tensor, expected: Tensor) -> float:
    """Relative error of a whole gradient vector."""
    return float((value - expected).norm() / expected.norm())


def test_enumeration_is_a_distribution(setting: dict[str, Tensor]) -> None:
    # the 27 sequence probabilities of each table sum to 1, and KL[q‖p] > 0 for these random tables
    ys = all_sequences()
    q = seq_logprob(setting["student"].detach(), ys).exp()
    p = seq_logprob(setting["teacher"], ys).exp()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float((q * (q / p).log()).sum()) > 0.1
    assert float(setting["exact"].norm()) > 0.1


def test_include_current_without_single_step_is_unbiased(setting: dict[str, Tensor]) -> None:
    g = estimate(setting, include_current=True, single_step=False)
    z = z_scores(g, setting["exact"])
    assert float(z.abs().max()) < 5.0, z
    assert rel_err(g.mean(0), setting["exact"]) < 0.05


def test_future_only_with_single_step_is_unbiased(setting: dict[str, Tensor]) -> None:
    g = estimate(setting, include_current=False, single_step=True)
    z = z_scores(g, setting["exact"])
    assert float(z.abs().max()) < 5.0, z
    assert rel_err(g.mean(0), setting["exact"]) < 0.05


def test_single_step_lowers_the_variance(setting: dict[str, Tensor]) -> None:
    # Why stabiliser 1 exists: taking the current token's term exactly instead of sampling it lowers
    # the total variance of the per-sequence gradient (here by about a third: 4.8 vs 7.1).
    sampled = estimate(setting, include_current=True, single_step=False)
    exact_step = estimate(setting, include_current=False, single_step=True)
    assert float(exact_step.var(0).sum()) < 0.8 * float(sampled.var(0).sum())


def test_reference_defaults_count_the_current_token_twice(setting: dict[str, Tensor]) -> None:
    # include_current=True AND single-step on (the reference code's defaults, a deliberate choice):
    # the estimate is off from the exact gradient by exactly the single-step term's expectation.
    g = estimate(setting, include_current=True, single_step=True)
    bias = single_step_bias(setting["student"], setting["teacher"])
    assert float(bias.norm() / setting["exact"].norm()) > 0.2
    z_exact = z_scores(g, setting["exact"])
    assert float(z_exact.abs().max()) > 10.0  # measurably biased...
    assert rel_err(g.mean(0), setting["exact"]) > 0.2
    z_biased = z_scores(g, setting["exact"] + bias)
    assert float(z_biased.abs().max()) < 5.0, z_biased  # ...by exactly the documented extra term
