"""The study's interval and MDE, checked by simulation: studies with a known effect and known seed / document /
residual variance (S = 3 seeds, as the shipped studies), 1,000 each. The 95% interval must cover the truth 93-97% of
the time in every setting -- seeds-dominated, documents-dominated, mixed, interaction-dominated, and 0/1 accuracy
pairs -- and a true effect equal to the MDE must be detected (interval excludes 0) about 80% of the time."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_llm.study import stats

N_STUDIES = 1000
S, D, EFFECT = 3, 100, 0.1

# (sd_seed, sd_doc, sd_resid) of the paired difference delta[s, d] = effect + u_s + v_d + e[s, d]
SETTINGS = {
    "seeds-dominated": (0.05, 0.01, 0.05),
    "documents-dominated": (0.005, 0.10, 0.05),
    "mixed": (0.02, 0.03, 0.10),
    "interaction-dominated": (0.0, 0.0, 0.20),
}


def _covers(table: np.ndarray, truth: float) -> bool:
    lo, hi = stats.two_way(table)["ci95"]
    return lo <= truth <= hi


@pytest.mark.parametrize("name", SETTINGS)
def test_interval_covers_the_truth_and_the_mde_has_80_percent_power(name):
    sd_seed, sd_doc, sd_resid = SETTINGS[name]
    rng = np.random.default_rng(2024)
    tables = stats.simulate_tables(rng, N_STUDIES, S, D, effect=EFFECT, sd_seed=sd_seed, sd_doc=sd_doc,
                                   sd_resid=sd_resid)
    coverage = np.mean([_covers(t, EFFECT) for t in tables])
    assert 0.93 <= coverage <= 0.97, f"{name}: coverage {coverage:.3f}"

    se, df = stats.planned({"var_seed": sd_seed ** 2, "var_doc": sd_doc ** 2, "var_resid": sd_resid ** 2}, S, D)
    mde = stats.mde80(se, df)
    tables = stats.simulate_tables(rng, N_STUDIES, S, D, effect=mde, sd_seed=sd_seed, sd_doc=sd_doc,
                                   sd_resid=sd_resid)
    power = np.mean([stats.verdict(stats.two_way(t)) == "excludes 0" for t in tables])
    assert 0.72 <= power <= 0.88, f"{name}: power at the MDE {power:.3f} (MDE {mde:.4f})"


def test_accuracy_pairs_coverage():
    """0/1 answers: document difficulty q_d, the arm answers right with probability q_d + 0.05 + a seed shift, both
    arms drawn independently per seed. The truth is the expected difference over the document population."""
    rng = np.random.default_rng(7)
    d_docs, effect, sd_seed = 200, 0.05, 0.02
    hits = 0
    for _ in range(N_STUDIES):
        q = rng.beta(2, 2, size=d_docs) * 0.9
        shift = rng.normal(0, sd_seed, size=(S, 1))
        base = rng.random((S, d_docs)) < q
        arm = rng.random((S, d_docs)) < np.clip(q + effect + shift, 0, 1)
        hits += _covers(arm.astype(float) - base.astype(float), effect)
    assert 0.93 <= hits / N_STUDIES <= 0.97, hits / N_STUDIES


def test_more_documents_or_seeds_shrink_the_mde_as_predicted():
    """The MDE a pilot predicts for a bigger study (stats.planned) matches the spread the bigger study shows."""
    components = {"var_seed": 0.02 ** 2, "var_doc": 0.1 ** 2, "var_resid": 0.1 ** 2}
    rng = np.random.default_rng(3)
    for s, d in ((3, 100), (3, 400), (6, 100)):
        se, _ = stats.planned(components, s, d)
        means = stats.simulate_tables(rng, N_STUDIES, s, d, effect=0.0, sd_seed=0.02, sd_doc=0.1,
                                      sd_resid=0.1).mean(axis=(1, 2))
        assert np.std(means) == pytest.approx(se, rel=0.08), (s, d)
