"""koret.significance: paired bootstrap interval and randomization p-value against answers known by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from koret.significance import compare_to_baseline, paired_comparison


def _exact_sign_flip_p(diff: list[float]) -> float:
    """Two-sided randomization p-value by enumerating every sign flip."""
    obs = abs(np.mean(diff))
    flips = [abs(np.mean([s * d for s, d in zip(signs, diff, strict=True)]))
             for signs in itertools.product((1, -1), repeat=len(diff))]
    return sum(f >= obs - 1e-12 for f in flips) / len(flips)


def test_every_query_gains_the_same():
    c = paired_comparison([0.2] * 5, [1.2] * 5)
    assert c.delta == pytest.approx(1.0) and c.ci_low == c.ci_high == pytest.approx(1.0)
    assert c.p_value == pytest.approx(2 / 32), "only the all-plus and all-minus flips are as extreme"
    assert c.queries == 5


def test_exact_randomization_p_values():
    assert paired_comparison([0] * 5, [1, 1, 1, 1, -1]).p_value == pytest.approx(12 / 32)
    rng = np.random.default_rng(3)
    base, other = rng.random(9), rng.random(9)
    assert paired_comparison(base, other).p_value == pytest.approx(_exact_sign_flip_p(list(other - base)))


def test_no_difference():
    c = paired_comparison([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    assert (c.delta, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_interval_of_two_queries():
    # resampled means of the gains {0, 1}: 0 (1/4), 0.5 (1/2), 1 (1/4); the 95% percentile interval is [0, 1]
    c = paired_comparison([0.0, 0.0], [0.0, 1.0])
    assert (c.ci_low, c.ci_high) == (0.0, 1.0)


def test_large_sample_matches_normal_theory_and_is_reproducible():
    rng = np.random.default_rng(0)
    base = rng.random(4000)
    other = base + rng.normal(0.03, 0.3, 4000)
    c = paired_comparison(base, other)
    diff = other - base
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert c.ci_low == pytest.approx(diff.mean() - 1.96 * se, abs=0.25 * se)
    assert c.ci_high == pytest.approx(diff.mean() + 1.96 * se, abs=0.25 * se)
    from scipy import stats

    t_p = stats.ttest_rel(other, base).pvalue
    assert c.p_value == pytest.approx(t_p, abs=0.002), "randomization and t-test agree on a large sample"
    assert c == paired_comparison(base, other), "seeded"
    null = paired_comparison(base, base + rng.normal(0.0, 0.3, 4000))
    assert null.ci_low < 0 < null.ci_high and null.p_value > 0.05


def test_compare_to_baseline_and_bad_input():
    per_query = {"a": {"ndcg@10": np.array([0.0, 0.5])}, "b": {"ndcg@10": np.array([1.0, 1.5])}}
    out = compare_to_baseline(per_query, "a", ["ndcg@10"])
    assert set(out) == {"b"} and out["b"]["ndcg@10"]["delta"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one length"):
        paired_comparison([1.0, 2.0], [1.0])
