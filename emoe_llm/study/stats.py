"""Intervals for a study's per-document results over seeds *and* documents, power, and multiple comparisons.

A study scores every cell (arm, seed) on the same documents, so a metric is a table x[s, d] (seeds x documents) and
a comparison against the baseline is the table of paired differences delta[s, d] = x_arm[s, d] - x_base[s, d]. Both
are read with the same model (docs/study.md):

    x[s, d] = mu + u_s + v_d + e[s, d]      u: one training run shifts all its documents, v: a document is easy or
                                            favours one arm in every seed, e: the rest
    Var(mean) = var_u / S + var_v / D + var_e / (S D)

estimated from the two-way ANOVA mean squares of the balanced table (variance components, floored at 0), with
Welch-Satterthwaite degrees of freedom for the t quantile. A t interval over the S per-seed means alone -- what a table
of seed averages gives -- leaves out var_v and is too narrow when documents are few.

    two_way([[1, 0, 1], [1, 1, 1]])   -> {"mean", "se", "df", "ci95", "var_seed", "var_doc", "var_resid", ...}
    mde80(se, df)                     -> the true difference this design finds 80% of the time (two-sided 0.05)
    planned(components, S, D)         -> (se, df) of a study of another size with the same variance components
    holm([0.01, 0.04, 0.2])           -> Holm-adjusted p-values
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
POWER = 0.80


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (normal for an infinite df)."""
    from scipy.stats import norm, t

    return float(norm.ppf(p)) if math.isinf(df) else float(t.ppf(p, df))


def _welch_df(parts: list[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variance estimates (value, df)."""
    total = sum(v for v, _ in parts)
    den = sum(v * v / df for v, df in parts if v > 0)
    return total * total / den if den > 0 else math.inf


def _doc_part(ms_doc: float, ms_res: float, S: int, D: int) -> tuple[float, float]:
    """(var_v / D estimate, its df): (MS_doc - MS_res) / (S D) floored at 0, Satterthwaite df of the difference."""
    if ms_doc <= ms_res:
        return 0.0, math.inf
    df = (ms_doc - ms_res) ** 2 / (ms_doc ** 2 / (D - 1) + ms_res ** 2 / ((S - 1) * (D - 1)))
    return (ms_doc - ms_res) / (S * D), df


def _interval(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(se, df) of the mean from its independent variance parts (value, df)."""
    return math.sqrt(sum(v for v, _ in parts)), _welch_df(parts)


def mean_squares(x: np.ndarray) -> tuple[float, float, float]:
    """Two-way ANOVA mean squares (seed, document, residual) of an S x D table, S, D > 1."""
    S, D = x.shape
    mean, seed_means, doc_means = x.mean(), x.mean(axis=1), x.mean(axis=0)
    ms_seed = D * float(((seed_means - mean) ** 2).sum()) / (S - 1)
    ms_doc = S * float(((doc_means - mean) ** 2).sum()) / (D - 1)
    resid = x - seed_means[:, None] - doc_means[None, :] + mean
    return ms_seed, ms_doc, float((resid ** 2).sum()) / ((S - 1) * (D - 1))


METHOD = "seed x document variance components (two-way ANOVA), Welch-Satterthwaite t"


def two_way(table) -> dict:
    """Mean of a seeds x documents table and its 95% interval counting both sources (see the module docstring).

    The variance of the mean splits into two independent parts: the spread of the S per-seed means,
    MS_seed / (S D) with S - 1 df (it carries var_u / S + var_e / (S D) exactly), and the documents' part
    var_v / D = (MS_doc - MS_res) / (S D), floored at 0; the t quantile takes their Welch-Satterthwaite df.

    One seed: documents only (the seed's shift cannot be estimated: said in ``method``). One document: a t
    interval over the seeds. A single value: no interval. ``ci95`` of a table with no variation at all is
    [mean, mean] with ``no_variation`` True -- it says nothing either way, it excludes nothing."""
    x = np.asarray(table, dtype=float)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty seeds x documents table, got shape {x.shape}")
    S, D = x.shape
    mean = float(x.mean())
    out = {"mean": mean, "n_seeds": S, "n_docs": D}
    if S > 1 and D > 1:
        ms_seed, ms_doc, ms_res = mean_squares(x)
        components = {"var_seed": max(0.0, (ms_seed - ms_res) / D), "var_doc": max(0.0, (ms_doc - ms_res) / S),
                      "var_resid": ms_res}
        se, df = _interval([(ms_seed / (S * D), S - 1), _doc_part(ms_doc, ms_res, S, D)])
        method = METHOD
    elif D > 1:  # one seed
        se, df = math.sqrt(float(x.var(ddof=1)) / D), D - 1
        components = {"var_seed": None, "var_doc": float(x.var(ddof=1)), "var_resid": None}
        method = "documents only: a single seed, so seed variance is not estimated and not in the interval"
    elif S > 1:  # one document (or per-seed summaries without per-document records)
        se, df = math.sqrt(float(x.var(ddof=1)) / S), S - 1
        components = {"var_seed": float(x.var(ddof=1)), "var_doc": None, "var_resid": None}
        method = "seeds only: no per-document records, so document sampling is not in the interval"
    else:
        return {**out, "se": None, "df": None, "ci95": None, "no_variation": None, "var_seed": None,
                "var_doc": None, "var_resid": None, "share_seed": None, "share_doc": None,
                "method": "a single value: no interval"}
    half = t_quantile(0.5 + CONFIDENCE / 2, df) * se if se > 0 else 0.0
    out.update(se=se, df=None if math.isinf(df) else df, ci95=[mean - half, mean + half], no_variation=se == 0,
               **components, **shares(components, S, D), method=method)
    return out


def shares(components: dict, S: int, D: int) -> dict:
    """The shares of Var(mean) that come from the seeds (var_u / S) and from the documents (var_v / D); the rest
    is the seed x document residual."""
    parts = {"seed": (components.get("var_seed") or 0.0) / S, "doc": (components.get("var_doc") or 0.0) / D,
             "resid": (components.get("var_resid") or 0.0) / (S * D)}
    total = sum(parts.values())
    if total <= 0:
        return {"share_seed": None, "share_doc": None}
    return {"share_seed": parts["seed"] / total, "share_doc": parts["doc"] / total}


def planned(components: dict, S: int, D: int) -> tuple[float, float]:
    """(se, df) the mean of an S x D study would have with these variance components: the expected mean squares
    E[MS_seed] = var_e + D var_u, E[MS_doc] = var_e + S var_v, E[MS_res] = var_e put through ``two_way``."""
    var_u, var_v, var_e = (components.get(k) or 0.0 for k in ("var_seed", "var_doc", "var_resid"))
    if S > 1 and D > 1:
        return _interval([((var_e + D * var_u) / (S * D), S - 1), _doc_part(var_e + S * var_v, var_e, S, D)])
    var_mean = var_u / S + var_v / D + var_e / (S * D)
    return math.sqrt(var_mean), (D - 1 if D > 1 else S - 1 if S > 1 else math.inf)


def mde80(se: float | None, df: float | None, *, power: float = POWER, confidence: float = CONFIDENCE) -> float | None:
    """The minimum detectable effect: the true difference a two-sided test at 1 - ``confidence`` rejects with
    probability ``power``, for an estimate with standard error ``se`` and ``df`` degrees of freedom (noncentral t;
    about 2.8 se when df is large). None without an se; 0 when there is no variation at all."""
    if se is None:
        return None
    if se == 0:
        return 0.0
    if df is None or math.isinf(df) or df > 1e6:
        return (t_quantile(0.5 + confidence / 2, math.inf) + t_quantile(power, math.inf)) * se
    from scipy.optimize import brentq

    df = max(float(df), 1.0)
    crit = t_quantile(0.5 + confidence / 2, df)
    hi = crit + t_quantile(power, df) + 1.0
    while _power(hi, df, crit) < power:
        hi *= 2
    return brentq(lambda nc: _power(nc, df, crit) - power, 0.0, hi, xtol=1e-6) * se


def _power(nc: float, df: float, crit: float, points: int = 4000) -> float:
    """P(|T| > crit) for a noncentral t with ``df`` and noncentrality ``nc``: the normal probability averaged over
    the chi-square quantiles of the variance estimate (scipy's nct returns NaN for small df and large nc)."""
    from scipy.stats import chi2, norm

    scale = np.sqrt(chi2.ppf((np.arange(points) + 0.5) / points, df) / df)
    return float(np.mean(norm.sf(crit * scale - nc) + norm.cdf(-crit * scale - nc)))


def p_value(mean: float, se: float | None, df: float | None) -> float | None:
    """Two-sided p of mean = 0 (t with ``df``); None without variation (no test is possible)."""
    if not se:
        return None
    from scipy.stats import norm, t

    z = abs(mean) / se
    return float(2 * (norm.sf(z) if df is None or math.isinf(df) else t.sf(z, df)))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values that exist (None stays None)."""
    index = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, out, running = len(index), list(p_values), 0.0
    for rank, (p, i) in enumerate(index):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(stats: dict) -> str:
    """'no interval' | 'no variation observed' | 'excludes 0' | 'includes 0' for an interval of a difference."""
    if stats.get("ci95") is None:
        return "no interval"
    if stats.get("no_variation"):
        return "no variation observed"
    lo, hi = stats["ci95"]
    return "excludes 0" if lo > 0 or hi < 0 else "includes 0"


def simulate_tables(rng: np.random.Generator, n: int, S: int, D: int, *, effect: float, sd_seed: float, sd_doc: float,
                    sd_resid: float) -> np.ndarray:
    """``n`` simulated S x D tables of paired differences from the model above (for the coverage and power tests)."""
    return (effect + rng.normal(0, sd_seed, (n, S, 1)) + rng.normal(0, sd_doc, (n, 1, D))
            + rng.normal(0, sd_resid, (n, S, D)))
