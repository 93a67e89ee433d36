"""Filter strategies and sampling on hand-computed scores."""

from __future__ import annotations

import numpy as np
import pytest

from koret.errors import KoretError
from koret.filter_rules import (
    FilterSettings,
    filter_candidates,
    sample_negatives,
    score_summary,
    upper_threshold,
)

# one row: positive 0.80; candidates in rank order; the second is a known positive
POS = np.array([0.80], dtype=np.float32)
CANDS = np.array([[0.90, 0.85, 0.79, 0.76, 0.70, 0.50, 0.30]], dtype=np.float32)
IS_POS = np.array([[False, True, False, False, False, False, False]])


def keep_of(**kw):
    keep, counts = filter_candidates(POS, CANDS, IS_POS, FilterSettings(**{"max_overlap": None, **kw}))
    return keep[0].tolist(), counts


def test_naive_keeps_everything_but_positives():
    keep, counts = keep_of(strategy="naive")
    assert keep == [True, False, True, True, True, True, True]
    assert counts["positive"] == 1 and counts["margin"] == 0


def test_perc_pos_drops_above_95_percent_of_positive():
    # threshold 0.80 * 0.95 = 0.76: 0.90 and 0.79 dropped, 0.76 kept (not strictly above)
    keep, counts = keep_of(strategy="perc_pos", perc=0.95)
    assert keep == [False, False, False, True, True, True, True]
    assert counts == {"positive": 1, "overlap": 0, "range": 0, "margin": 2, "max_score": 0, "min_score": 0}


def test_perc_pos_threshold_is_sign_safe():
    # a negative positive score keeps the threshold below the positive: -0.2 - 0.2 * 0.05 = -0.21
    np.testing.assert_allclose(upper_threshold(np.array([-0.2, 0.5]), FilterSettings(strategy="perc_pos", perc=0.95)), [-0.21, 0.475],
                               rtol=1e-6)


def test_margin_pos_drops_within_margin_of_positive():
    # threshold 0.80 - 0.05 = 0.75: 0.90, 0.79, 0.76 dropped
    keep, counts = keep_of(strategy="margin_pos", margin=0.05)
    assert keep == [False, False, False, False, True, True, True]
    assert counts["margin"] == 3


def test_abs_drops_above_max_score():
    keep, counts = keep_of(strategy="abs", max_score=0.75)
    assert keep == [False, False, False, False, True, True, True]
    assert counts["max_score"] == 3 and counts["margin"] == 0


def test_shifted_skips_first_ranks_counting_non_positives_only():
    # ranks among non-positives: 0.90->0, 0.79->1, 0.76->2 ...; range_min 2 skips 0.90 and 0.79
    keep, counts = keep_of(strategy="shifted", range_min=2)
    assert keep == [False, False, False, True, True, True, True]
    assert counts["range"] == 2


def test_range_max_and_min_score_apply_to_any_strategy():
    keep, counts = keep_of(strategy="naive", range_max=4, min_score=0.6)
    # ranks 0..3 are 0.90, 0.79, 0.76, 0.70; min_score drops nothing further among them
    assert keep == [True, False, True, True, True, False, False]
    assert counts["range"] == 2
    keep, counts = keep_of(strategy="naive", min_score=0.6)
    assert keep == [True, False, True, True, True, False, False]
    assert counts["min_score"] == 2


def test_thresholds_are_per_row():
    pos = np.array([0.8, 0.6], dtype=np.float32)
    cands = np.array([[0.7, 0.58], [0.7, 0.58]], dtype=np.float32)
    keep, _ = filter_candidates(pos, cands, np.zeros((2, 2), bool), FilterSettings(strategy="perc_pos", perc=0.95, max_overlap=None))
    assert keep.tolist() == [[True, True], [False, False]]


def test_padding_is_never_kept():
    cands = np.array([[0.5, -np.inf]], dtype=np.float32)
    keep, counts = filter_candidates(POS, cands, np.zeros((1, 2), bool),
                                     FilterSettings(strategy="naive", max_overlap=None))
    assert keep.tolist() == [[True, False]]


def test_sample_top_takes_best_ranks_in_order():
    keep = np.array([[False, True, True, False, True, True]])
    assert sample_negatives(keep, 3, "top").tolist() == [[1, 2, 4]]


def test_sample_marks_shortage_with_minus_one():
    keep = np.array([[False, True, False, False]])
    assert sample_negatives(keep, 3, "top").tolist() == [[1, -1, -1]]


def test_sample_random_is_seeded_uniform_among_survivors_and_rank_ordered():
    keep = np.zeros((2000, 10), bool)
    keep[:, [0, 3, 5, 6, 9]] = True
    cols = sample_negatives(keep, 2, "random", seed=1)
    assert np.isin(cols, [0, 3, 5, 6, 9]).all()
    assert (np.diff(cols, axis=1) > 0).all()
    freq = np.bincount(cols.ravel(), minlength=10)[[0, 3, 5, 6, 9]] / cols.size
    np.testing.assert_allclose(freq, 0.2, atol=0.03)
    pairs = np.bincount(cols[:, 0] * 10 + cols[:, 1], minlength=100)  # the 10 pairs of survivors equally often
    pairs = pairs[pairs > 0] / len(cols)
    assert len(pairs) == 10 and np.allclose(pairs, 0.1, atol=0.025)
    assert (cols == sample_negatives(keep, 2, "random", seed=1)).all()
    assert (cols != sample_negatives(keep, 2, "random", seed=2)).any(axis=1).mean() > 0.5
    # a row draws by its global index: rows 1000..1999 alone draw what they drew among all 2000
    part = sample_negatives(keep[1000:], 2, "random", seed=1, rows=np.arange(1000, 2000))
    assert (part == cols[1000:]).all()


def test_row_uniforms_are_uniform_and_independent_of_the_split():
    from koret.filter_rules import row_uniforms

    u = row_uniforms(7, np.arange(20_000), 50)
    assert u.shape == (20_000, 50) and u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=20, range=(0, 1))[0] / u.size
    np.testing.assert_allclose(hist, 0.05, atol=0.002)
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03
    np.testing.assert_array_equal(row_uniforms(7, np.arange(5_000, 6_000), 50), u[5_000:6_000])


def test_settings_cross_checks():
    with pytest.raises(KoretError, match="max_score"):
        FilterSettings(strategy="abs").check()
    with pytest.raises(KoretError, match="range_min"):
        FilterSettings(strategy="shifted").check()
    with pytest.raises(KoretError, match="range_max"):
        FilterSettings(range_min=5, range_max=3).check()


def test_score_summary():
    s = score_summary(np.array([0.1, 0.2, 0.3, np.nan]))
    assert s["count"] == 3 and s["p50"] == pytest.approx(0.2) and s["max"] == pytest.approx(0.3)


def test_candidates_take_slices_every_per_query_field():
    """A range of queries keeps the teacher's scores of rescored candidates and the candidates' sources."""
    from dataclasses import fields

    from koret.filter_rules import Candidates

    q = 5
    c = Candidates([f"q{i}" for i in range(q)], [f"질문 {i}" for i in range(q)],
                   [np.array([i]) for i in range(q)], [np.array([0.9], np.float32) for _ in range(q)],
                   np.arange(q * 3).reshape(q, 3), np.linspace(0, 1, q * 3, dtype=np.float32).reshape(q, 3),
                   rescored=True, teacher_positive_scores=[np.array([0.5 + i]) for i in range(q)],
                   teacher_candidate_scores=np.arange(q * 3, dtype=np.float32).reshape(q, 3) / 10,
                   candidate_sources=np.ones((q, 3), np.int8) * np.arange(1, q + 1, dtype=np.int8)[:, None],
                   overlap=np.arange(q * 3, dtype=np.float32).reshape(q, 3) / 20)
    part = c.take(range(1, 3))
    assert part.rescored
    for f in fields(c):
        if f.name in ("rescored", "calibration"):  # flags and figures of the whole set, not per query
            continue
        whole, got = getattr(c, f.name), getattr(part, f.name)
        assert len(got) == 2, f.name
        for i in range(2):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(whole[1 + i]), err_msg=f.name)


def test_the_settings_defaults_are_the_configs():
    """FilterSettings() (the Python API's) is the filter koret mine applies by default (FilterConfig's): they
    differed (perc_pos 0.95 without the guard vs naive with max_overlap 0.9)."""
    from dataclasses import asdict

    from koret.config import FilterConfig

    assert asdict(FilterSettings()) == asdict(FilterSettings.from_config(FilterConfig()))
    assert (FilterSettings().strategy, FilterSettings().max_overlap) == ("naive", 0.9)
