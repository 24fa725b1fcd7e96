"""How a model stops: length quantiles and EOS calibration along its own samples (pure numpy, no torch)."""

from __future__ import annotations

import numpy as np


def eos_curves(q_eos: np.ndarray, p_eos: np.ndarray, mask: np.ndarray) -> dict[str, list[float]]:
    """How stopping is calibrated on one model's own samples, per response position t = 1..L:

        q_eos[t], p_eos[t]    mean over the samples still generating at t of the student's and the
                              teacher's probability of ending the response there;
        stopped_q[L], stopped_p[L]   1 − mean_samples Π_{t ≤ min(L, n)} (1 − h_t): each model's
                              probability of having stopped by length L along the sampled paths
                              (h = q_eos or p_eos; a sample of n tokens contributes its n positions).

    Args:
        q_eos, p_eos: (N, L) per-position probabilities (0 where `mask` is 0).
        mask: (N, L) 1 on the samples' response positions (EOS included).
    """
    valid = mask > 0
    count = valid.sum(0)
    keep = count > 0
    mean = lambda x: np.where(keep, (x * valid).sum(0) / np.maximum(count, 1), np.nan)  # noqa: E731
    survive_q = np.cumprod(np.where(valid, 1.0 - q_eos, 1.0), axis=1)
    survive_p = np.cumprod(np.where(valid, 1.0 - p_eos, 1.0), axis=1)
    n = int(keep.sum())
    return {"q_eos": mean(q_eos)[:n].tolist(), "p_eos": mean(p_eos)[:n].tolist(), "count": count[:n].tolist(),
            "stopped_q": (1.0 - survive_q.mean(0))[:n].tolist(), "stopped_p": (1.0 - survive_p.mean(0))[:n].tolist()}


def length_quantiles(lengths: list[int]) -> dict[str, float]:
    """p10, p25, median, p75, p90 and the max of response lengths (tokens)."""
    if not lengths:
        return {}
    q = np.quantile(np.array(lengths, dtype=np.float64), [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"p10": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p90": float(q[4]),
            "max": float(max(lengths))}
