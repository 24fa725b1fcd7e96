"""Length and stopping in the quality study (issue 31): what the divergence report says about each
model's answers and its EOS calibration, and the RQ5 table (teacher-mix strength, pre-training loss).

The divergence report (`Study.eval_divergences`, metrics kl, exposure_bias, eos, length) holds, per
model and on that model's own samples (first seed, the divergence rows): the length quantiles and the
share that stopped by itself, `eos_gap` = mean over response positions of q(EOS) − p(EOS) (percentage
points), the per-position curves of q(EOS), p(EOS) and of each model's probability of having stopped
by length L, and with the default `minillm` as baseline the paired 95% intervals of every arm's
difference in reverse KL, eos_gap, length and stopped share.
"""

from __future__ import annotations

from typing import Any

BUCKETS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 256))
"""Response positions (1-based, EOS included) over which the EOS calibration is averaged."""
STOP_AT = (8, 16, 32, 64)
"""Lengths L at which each model's probability of having stopped is shown."""
RQ5_ARMS = {"minillm-no-mix": "teacher_mix 0", "minillm": "teacher_mix 0.2 (default)",
            "minillm-mix0.5": "teacher_mix 0.5", "minillm-pt": "teacher_mix 0.2 + pre-training loss"}
FIX_ARMS = {"minillm-long": "rollouts of 192 tokens (truncation rare)",
            "minillm-discnorm": "discounted length normalisation (method.discounted_norm)",
            "minillm-no-norm": "no length normalisation (method.length_norm false)"}


def bucketed(curve: dict[str, list[float]], key: str) -> list[float | None]:
    """The count-weighted mean of a per-position curve over each of BUCKETS."""
    out: list[float | None] = []
    for lo, hi in BUCKETS:
        pairs = [(v, c) for t, (v, c) in enumerate(zip(curve[key], curve["count"]), 1) if lo <= t <= hi and c]
        n = sum(c for _, c in pairs)
        out.append(sum(v * c for v, c in pairs) / n if n else None)
    return out


def stopping_rows(div: dict[str, Any], label_of: dict[str, str]) -> dict[str, Any]:
    """Per model of the divergence report (by study row name): length, stopping and EOS calibration."""
    by_baseline = div.get("comparisons") or {}
    if not by_baseline and div.get("comparison"):
        by_baseline = {div["comparison"]["baseline"]: div["comparison"]}
    default = next((b for b in by_baseline if label_of.get(b) == "minillm"), None)
    diffs = (by_baseline.get(default) or {}).get("models", {}) if default else {}
    rows: dict[str, Any] = {}
    for model in div["models"]:
        name = label_of.get(model["name"], "teacher" if model["name"].endswith("(teacher)") else model["name"])
        m, curves = model["metrics"], model.get("curves") or {}
        eos = curves.get("eos")
        row: dict[str, Any] = {
            "length": (m.get("length") or {}).get("mean"), "stopped": (m.get("stopped") or {}).get("mean"),
            "quantiles": curves.get("length"), "eos_gap": (m.get("eos_gap") or {}).get("mean"),
            "rkl": (m.get("rkl_student") or {}).get("mean"),
        }
        if eos:
            row["gap_by_bucket"] = [None if q is None or p is None else 100.0 * (q - p)
                                    for q, p in zip(bucketed(eos, "q_eos"), bucketed(eos, "p_eos"))]
            row["stopped_by"] = {L: (eos["stopped_q"][min(L, len(eos["stopped_q"])) - 1],
                                     eos["stopped_p"][min(L, len(eos["stopped_p"])) - 1]) for L in STOP_AT}
        exacc = next((k for k in m if k.startswith("exaccerr@")), None)
        row["exaccerr"] = (m.get(exacc) or {}).get("mean") if exacc else None
        row["vs_minillm"] = {k: diffs[model["name"]][k] for k in ("rkl_student", "eos_gap", "length", "stopped")
                             if model["name"] in diffs and k in diffs[model["name"]]}
        rows[name] = row
    return rows


def _f(v: float | None, decimals: int = 1) -> str:
    return "-" if v is None else f"{v:.{decimals}f}"


def _ci(d: dict[str, Any] | None, decimals: int = 2) -> str:
    if not d or d.get("low") is None:
        return "-"
    text = f"{d['diff']:+.{decimals}f} [{d['low']:+.{decimals}f}, {d['high']:+.{decimals}f}]"
    return text + (" within noise" if d["within_noise"] else "")


def render_stopping(block: dict[str, Any]) -> list[str]:
    """Markdown: per model the length distribution, stopping and EOS calibration on its own samples."""
    rows = block.get("stopping") or {}
    if not rows:
        return []
    lines = [f"Length and stopping on each model's own samples (first {block['div_prompts']} prompts, seed "
             f"{block['div_seed']}; tokens of the model's tokenizer, EOS not counted): length quantiles, the share "
             f"that stopped before the {block['div_new_tokens']}-token budget, and EOS calibration — q(EOS) − p(EOS) in percentage points "
             "averaged over response positions (all, then by position bucket), and each model's probability of "
             "having stopped by length L along the sampled paths (the model itself / the teacher).", "",
             "| model | length p10 / p50 / p90 (mean) | stopped | q(EOS) − p(EOS) | by position "
             + " / ".join(f"{lo}-{hi}" for lo, hi in BUCKETS[:5]) + " | stopped by L = "
             + ", ".join(map(str, STOP_AT)) + " (q / p) |", "|---|---|---:|---:|---|---|"]
    for name, r in rows.items():
        q = r.get("quantiles") or {}
        dist = f"{_f(q.get('p10'), 0)} / {_f(q.get('p50'), 0)} / {_f(q.get('p90'), 0)} ({_f(r['length'])})"
        gaps = " / ".join(_f(g) for g in (r.get("gap_by_bucket") or [None] * len(BUCKETS))[:5])
        stop = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in (r.get("stopped_by") or {}).values()) or "-"
        lines.append(f"| {name} | {dist} | {_f(r['stopped'])} % | {_f(r['eos_gap'], 2)} | {gaps} | {stop} |")
    return [*lines, ""]


def render_rq5(block: dict[str, Any], rouge: dict[str, Any]) -> list[str]:
    """Markdown: RQ5 (teacher-mix strength, pre-training loss) and the length fixes, each against the
    default `minillm` with paired 95% intervals (Rouge-L: all prompts and seeds; the rest: the divergence rows)."""
    rows = block.get("stopping") or {}
    arms = [(a, label) for a, label in {**RQ5_ARMS, **FIX_ARMS}.items() if a in rows]
    if len(arms) < 2:
        return []
    lines = ["| arm | setting | Rouge-L (− default) | reverse KL (− default) | length (− default) | stopped % "
             "(− default) | q(EOS) − p(EOS) (− default) | ExAccErr |", "|---|---|---|---|---|---|---|---:|"]
    for arm, label in arms:
        r, d = rows[arm], rows[arm].get("vs_minillm", {})
        rg = rouge.get(arm, {})
        lines.append(
            f"| {arm} | {label} | {_f(rg.get('rougeL'), 2)} ({_ci(rg.get('vs_minillm'))}) | {_f(r['rkl'], 3)} "
            f"({_ci(d.get('rkl_student'), 3)}) | {_f(r['length'])} ({_ci(d.get('length'), 1)}) | {_f(r['stopped'])} "
            f"({_ci(d.get('stopped'), 1)}) | {_f(r['eos_gap'], 2)} ({_ci(d.get('eos_gap'))}) | {_f(r['exaccerr'])} |")
    return [*lines, ""]
