"""Student t intervals over seeds, and paired differences against a baseline arm.

    t_interval([0.31, 0.33, 0.35])  -> {"mean": 0.33, "ci95": [0.2803..., 0.3796...], "n": 3, "values": [...]}
    paired({1: 0.35, 2: 0.30}, {1: 0.31, 2: 0.29})  -> the mean of the per-seed differences and its t interval

n = 1 gives no interval (``ci95`` is None): one seed says nothing about seed noise. The t quantile comes from scipy
when it is installed, else from the exact Student t CDF (regularized incomplete beta) inverted by bisection.
"""

from __future__ import annotations

import math


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p in (0.5, 1))."""
    try:
        from scipy.stats import t

        return float(t.ppf(p, df))
    except ImportError:
        return _t_quantile_exact(p, df)


def _t_quantile_exact(p: float, df: int) -> float:
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) = 1 - I_{df/(df+x^2)}(df/2, 1/2) / 2 for x >= 0."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Lentz), the symmetric form for large x."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


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
