"""koret.significance: paired bootstrap interval and randomization p-value against answers known by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from koret.significance import compare_to_baseline, macro_paired_comparison, paired_comparison


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


# --------------------------------------------------------------------------------------------- macro average


def test_macro_average_by_hand():
    # set A gains {0, 1} (2 queries), set B gains 0.2 on each of 4: the macro gain is (0.5 + 0.2) / 2 = 0.35, not
    # the pooled mean 1.8 / 6 = 0.3; B's mean never changes, A's resampled mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), so
    # the resampled macro gains are 0.1, 0.35, 0.6 and the 95% percentile interval is [0.1, 0.6]
    c = macro_paired_comparison([[0, 0], [0, 0, 0, 0]], [[0, 1], [0.2] * 4])
    assert c.delta == pytest.approx(0.35) and c.queries == 6
    assert (c.ci_low, c.ci_high) == pytest.approx((0.1, 0.6))
    # one query in A (gain 0.5), B gains {0, 1}: macro (0.5 + 0.5) / 2; the gains weighted 3 / (2 x set size) are
    # 0.75 | 0, 0.75; of the 8 sign flips, those that keep A's and B's 0.75 alike (4) reach |0.5|: p = 0.5
    c = macro_paired_comparison([[0.0], [0.0, 0.0]], [[0.5], [0.0, 1.0]])
    assert c.delta == pytest.approx(0.5) and c.p_value == pytest.approx(0.5)
    assert (c.ci_low, c.ci_high) == pytest.approx((0.25, 0.75)), "A's one query is never resampled away"
    c = macro_paired_comparison([[0.1], [0.2, 0.3]], [[0.6], [0.7, 0.8]])
    assert c.delta == c.ci_low == c.ci_high == pytest.approx(0.5), "every gain equal: a point interval"


def test_macro_average_of_one_set_is_the_paired_comparison():
    rng = np.random.default_rng(5)
    base, other = rng.random(40), rng.random(40)
    assert macro_paired_comparison([base], [other]) == paired_comparison(base, other)
    assert macro_paired_comparison([base], [other], seed=3, confidence=0.9, resamples=500) == \
        paired_comparison(base, other, seed=3, confidence=0.9, resamples=500)


def test_macro_average_against_brute_force():
    """Every bootstrap resample (each set's queries drawn from that set alone: 3**3 x 4**4 equally likely draws)
    and every sign flip (2**7) enumerated: the exact p-value, and the percentile interval within Monte Carlo
    error of the exact one."""
    rng = np.random.default_rng(11)
    base = [rng.random(3), rng.random(4)]
    other = [rng.random(3), rng.random(4)]
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    c = macro_paired_comparison(base, other, resamples=20_000)
    assert c.delta == pytest.approx(np.mean([d.mean() for d in diffs]), abs=1e-12)

    def macro(parts: list[np.ndarray]) -> float:
        return float(np.mean([p.mean() for p in parts]))

    flips = [abs(macro([diffs[0] * np.array(signs[:3]), diffs[1] * np.array(signs[3:])]))
             for signs in itertools.product((1, -1), repeat=7)]
    exact_p = sum(f >= abs(c.delta) - 1e-12 for f in flips) / len(flips)
    assert c.p_value == pytest.approx(exact_p, abs=1e-12)

    draws = np.array([macro([diffs[0][list(i)], diffs[1][list(j)]])
                      for i in itertools.product(range(3), repeat=3) for j in itertools.product(range(4), repeat=4)])
    low, high = np.quantile(draws, [0.025, 0.975])
    spread = draws.max() - draws.min()
    assert c.ci_low == pytest.approx(low, abs=0.03 * spread) and c.ci_high == pytest.approx(high, abs=0.03 * spread)
    assert draws.mean() == pytest.approx(c.delta, abs=1e-12), "the bootstrap distribution is centred on the gain"


def test_macro_bad_input():
    with pytest.raises(ValueError, match="same sets"):
        macro_paired_comparison([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="set 1: no queries"):
        macro_paired_comparison([[1.0], []], [[1.0], []])
    with pytest.raises(ValueError, match="no sets"):
        macro_paired_comparison([], [])
