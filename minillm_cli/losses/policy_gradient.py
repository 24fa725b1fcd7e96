"""MiniLLM's policy-gradient pieces (algorithm.md §3-4): per-token advantages (discounted,
length-normalised returns, whitened over data-parallel ranks through a `reduce_fn`) and the
PPO-style clipped policy loss. Pure functions, fp32 (fp64 for the whitening statistics), masked
positions give exactly 0; the conventions of `minillm_cli.losses` hold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from minillm_cli.losses.logprobs import masked_mean


def advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.95,
    include_current: bool = True,
    length_norm: bool = True,
    discounted_norm: bool = False,
    whiten: bool = True,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-token advantages of MiniLLM (algorithm.md §3), detached, fp32.

    Positions are counted within the valid response only: a masked position neither contributes a
    reward nor consumes a discount step (so left or right padding, or an early EOS, never leaks).
    Let `k(t, t')` be the number of valid positions in [t, t') and `n_t` the number of valid
    positions from t on (incl. t). Then

        include_current=True:   G_t = Σ_{t' ≥ t valid} γ^k(t,t') r_t',   Â_t = G_t / max(n_t, 1)
        include_current=False:  G_t = Σ_{t' > t valid} γ^k(t,t') r_t',   Â_t = G_t / max(n_t − 1, 1)

    i.e. with `include_current=False` the next valid token is discounted by γ (G_t = γ·G^incl_{t+1}),
    and length normalisation divides by the number of rewards actually summed (the future tokens,
    n_t − 1), so Â_t is the mean of the future rewards; at the last token G_t = 0 and Â_t = 0.
    Without `length_norm`, Â_t = G_t.

    `discounted_norm` (with `length_norm`) divides by the sum of the discount weights instead,
    D_t = Σ_{t' summed} γ^k(t,t') (= n_t when γ = 1), so Â_t is the γ-weighted MEAN of the summed
    rewards: a constant reward r gives Â_t = r at every t. Divided by the plain count, the same
    rewards give Â_t = r·(1 − γ^n)/((1 − γ)·n), which shrinks towards 0 as the remaining length n
    grows — with the usual negative rewards, every continuing token is then credited more than a
    stop (docs/algorithm.md §3, bench/QUALITY.md Study 3).

    With `whiten`:

        A_t = (Â_t − mean) / sqrt(var + 1e-8),   mean/var (population) over all valid tokens

    where the statistics are sums [Σ Â, Σ Â², count] passed through `reduce_fn` (an all-reduce-sum
    over data-parallel ranks; identity by default) in one call, in fp64 so E[Â²] − mean² is accurate.

    Args:
        rewards: (B, T) per-token rewards r_t (e.g. log p − log q_old); values at masked positions are ignored.
        mask: (B, T), non-zero = valid response token.
        gamma: discount γ.
        include_current: whether r_t is part of G_t.
        length_norm: divide by the number of summed rewards.
        discounted_norm: with `length_norm`, divide by the summed discount weights instead.
        whiten: normalise to zero mean and unit variance over valid tokens.
        reduce_fn: sums a small tensor over ranks; None = single process.

    Returns:
        (B, T) fp32 advantages, 0 at masked positions, no gradient.
    """
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    valid = mask != 0  # (B, T)
    r = torch.where(valid, rewards.detach().float(), 0.0)  # (B, T) padded rewards are zeroed
    returns = torch.zeros_like(r)  # (B, T) G_t including the current reward
    weights = torch.zeros_like(r)  # (B, T) D_t: the same recursion over rewards of 1
    running = r.new_zeros(r.shape[0])  # (B,)
    running_w = r.new_zeros(r.shape[0])  # (B,)
    for t in reversed(range(r.shape[1])):
        # valid: G_t = r_t + γ·G_next; masked: pass G_next through unchanged (no reward, no discount step)
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        running_w = torch.where(valid[:, t], 1.0 + gamma * running_w, running_w)
        returns[:, t] = running
        weights[:, t] = running_w
    remaining = valid.flip(-1).cumsum(-1).flip(-1)  # (B, T) n_t: valid positions from t on, incl. t
    if include_current:
        adv, count, total_w = returns, remaining, weights
    else:
        adv, count, total_w = returns - r, remaining - 1, weights - 1.0  # G_t = G^incl_t − r_t = γ·G^incl_{next}
    if length_norm and discounted_norm:
        adv = torch.where(total_w > 0, adv / total_w.clamp_min(1e-12), 0.0)
    elif length_norm:
        adv = adv / count.clamp_min(1)
    adv = torch.where(valid, adv, 0.0)
    if whiten:
        x = adv.double()
        stats = torch.stack([x.sum(), x.square().sum(), valid.sum().double()])  # masked x are 0
        if reduce_fn is not None:
            stats = reduce_fn(stats)
        n = stats[2].clamp_min(1)
        mean = stats[0] / n
        var = (stats[1] / n - mean.square()).clamp_min(0)
        adv = torch.where(valid, ((x - mean) / torch.sqrt(var + 1e-8)).float(), 0.0)
    return adv


def policy_loss(
    logq_new: Tensor,
    logq_old: Tensor,
    log_w: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO-style clipped policy-gradient loss per token (algorithm.md §4).

        ρ_t = exp(log q_θ(y_t) − log q_old(y_t)) · w_t          (= q_θ / p̃ with w_t = q_old / p̃)
        loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))         (clip_eps None: loss_t = −A_t·ρ_t)

    Only `logq_new` carries a gradient (`logq_old`, `log_w` and `adv` are detached); when ρ is not
    clipped, ∇loss_t = −A_t·ρ_t·∇log q_θ(y_t). The caller reduces with `sum_and_count` /
    global count, i.e. `L_pg = Σ_t m_t loss_t / Σ_t m_t`.

    Args:
        logq_new: (B, T) log q_θ of the sampled tokens under the current student.
        logq_old: (B, T) log q_old at sampling time.
        log_w: (B, T) log importance weight log(q_old / p̃); 0 for pure student sampling.
        adv: (B, T) advantages A_t.
        mask: (B, T), non-zero = valid.
        clip_eps: ε, or None to disable clipping.

    Returns:
        `(loss, clip_fraction)`: (B, T) fp32 per-token loss (0 at masked positions), and the fp32 scalar
        fraction of valid tokens where the clipped term was the larger one (0 without clipping).
    """
    valid = mask != 0  # (B, T)
    log_ratio = logq_new.float() - logq_old.detach().float() + log_w.detach().float()  # (B, T)
    ratio = torch.where(valid, log_ratio, 0.0).exp()  # (B, T), 1 at masked positions
    a = torch.where(valid, adv.detach().float(), 0.0)  # (B, T)
    loss = -a * ratio
    if clip_eps is None:
        clip_frac = loss.new_zeros(())
    else:
        clipped = -a * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        use_clipped = clipped > loss  # (B, T) the pessimistic (clipped) branch wins
        loss = torch.where(use_clipped, clipped, loss)
        clip_frac = masked_mean(use_clipped.float(), valid).detach()
    return torch.where(valid, loss, 0.0), clip_frac


def sequence_rkl(logq: torch.Tensor, logp: torch.Tensor, log_mix: torch.Tensor,
                 mask: torch.Tensor) -> tuple[float, float]:
    """Self-normalised importance-sampling estimate of the sequence-level KL[q ‖ p] from samples of p~.

        W_i = exp(Σ_t m_it (logq_it − log_mix_it)) = q(y_i) / p~(y_i),
        KL ≈ Σ_i W_i · Σ_t m_it (logq_it − logp_it) / Σ_i W_i

    (consistent; exactly the plain mean when log_mix = logq, i.e. pure student sampling). The plain
    mean over p~ samples would estimate E_p~[log q/p] instead, which is not a KL.

    Args:
        logq: (N, T) log q(y_t) of the sampled tokens (the sampling-time student).
        logp: (N, T) log p(y_t) (teacher).
        log_mix: (N, T) log p~(y_t), the probability each token was drawn with.
        mask: (N, T) 1 on response tokens.

    Returns:
        `(kl, ess)`: the estimate (nats per sequence) and the effective sample size of the weights,
        (Σ W)² / Σ W² / N, in (0, 1].
    """
    m = mask.double()
    seq_kl = ((logq.double() - logp.double()) * m).sum(-1)  # (N,)
    log_w = ((logq.double() - log_mix.double()) * m).sum(-1)  # (N,) log W_i
    w = torch.softmax(log_w, 0)  # (N,) normalised weights, overflow-safe
    return float((w * seq_kl).sum()), float(1.0 / (w.square().sum() * w.numel()))
