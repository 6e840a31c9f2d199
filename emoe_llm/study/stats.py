"""Student t intervals over seeds, and paired differences against a baseline arm.

    t_interval([0.31, 0.33, 0.35])  -> {"mean": 0.33, "ci95": [0.2803..., 0.3796...], "n": 3, "values": [...]}
    paired({1: 0.35, 2: 0.30}, {1: 0.31, 2: 0.29})  -> the mean of the per-seed differences and its t interval

n = 1 gives no interval (``ci95`` is None): one seed says nothing about seed noise. The t quantile is scipy's.
"""

from __future__ import annotations

import math


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and Student t interval of ``values`` (seeds); ``ci95`` None when there is a single value."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "values": values}


def paired(arm: dict[int, float], baseline: dict[int, float], confidence: float = 0.95) -> dict:
    """Per-seed differences arm - baseline over the seeds both have, with their t interval."""
    seeds = sorted(set(arm) & set(baseline))
    diffs = [arm[s] - baseline[s] for s in seeds]
    stats = t_interval(diffs, confidence)
    return {"mean_diff": stats["mean"], "ci95": stats["ci95"], "n": stats["n"], "seeds": seeds, "diffs": diffs}


def excludes_zero(ci: list[float] | None) -> bool | None:
    """True when the interval lies wholly on one side of 0; None without an interval."""
    if ci is None:
        return None
    return ci[0] > 0 or ci[1] < 0
