"""Is a difference between two systems on the same queries more than noise? Pure functions of per-query scores.

Two systems scored on the same queries give paired samples: ``other[i] - base[i]`` is query ``i``'s gain. Two
standard tools of IR evaluation (Smucker, Allan & Carterette, "A Comparison of Statistical Significance Tests
for Information Retrieval Evaluation", CIKM 2007; Sakai, "Statistical reform in information retrieval?",
SIGIR Forum 2014), both through :mod:`scipy.stats`:

- the **paired bootstrap** confidence interval of the mean gain: queries are resampled with replacement, each
  resample keeps every query's pair together (``scipy.stats.bootstrap`` on the differences, percentile method);
- the **paired randomization test** (Fisher's sign-flip permutation test, the one trec-tools and ranx call
  "fisher"): under the null hypothesis that the two systems are exchangeable, each query's gain is equally likely
  positive or negative; the two-sided p-value is the share of sign flips whose mean gain is at least as far from
  zero as the observed one (``scipy.stats.permutation_test``, ``permutation_type="samples"``; exact when
  ``2**n`` does not exceed ``resamples``).

Both are seeded, so the same scores give the same interval and p-value on every run. For a suite of test
sets, :func:`macro_paired_comparison` does both for the macro average over the sets (the mean of the set
means): the bootstrap resamples queries within each set, independently per set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedComparison:
    """``other - base`` over the same queries."""

    delta: float  # mean gain
    ci_low: float  # confidence interval of the mean gain (paired bootstrap)
    ci_high: float
    p_value: float  # two-sided paired randomization test
    queries: int
    confidence: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(base: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray, *,
                      resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                      seed: int = 0) -> PairedComparison:
    """Mean gain of ``other`` over ``base``, its bootstrap confidence interval and the randomization p-value."""
    from scipy import stats

    base_a = np.asarray(base, dtype=np.float64)
    other_a = np.asarray(other, dtype=np.float64)
    if base_a.shape != other_a.shape or base_a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d arrays of one length, got {base_a.shape} and {other_a.shape}")
    diff = other_a - base_a
    n = len(diff)
    if n == 0:
        raise ValueError("no queries to compare")
    delta = float(diff.mean())
    if np.all(diff == diff[0]):  # every resample has this mean (scipy would call the bootstrap degenerate)
        low, high = delta, delta
    else:
        ci = stats.bootstrap((diff,), _mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    test = stats.permutation_test((diff,), _mean, permutation_type="samples", alternative="two-sided",
                                  n_resamples=resamples, vectorized=True, rng=np.random.default_rng(seed + 1))
    return PairedComparison(delta, low, high, min(1.0, float(test.pvalue)), n, confidence)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def macro_paired_comparison(base: Sequence[Sequence[float] | np.ndarray], other: Sequence[Sequence[float] | np.ndarray],
                            *, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                            seed: int = 0) -> PairedComparison:
    """Gain of ``other`` over ``base`` on the macro average of several test sets: the mean over the sets of each
    set's mean per-query gain, so every set counts alike however many queries it has.

    ``base[s]`` and ``other[s]`` are set ``s``'s per-query scores, in one query order. The interval is a
    stratified paired bootstrap: each resample draws every set's queries with replacement from that set alone
    (independently per set, each keeping its size), takes each set's mean gain, then averages those set means;
    the percentile interval is that of the averages. The p-value is the paired randomization test of the same
    statistic: each query's gain flips sign independently (the macro average is a weighted mean of the gains,
    weight ``1 / (sets x queries of its set)``, so this is the sign-flip test of the weighted gains). A set whose
    gains are all equal has the same mean in every resample and is not resampled. With one set this is exactly
    :func:`paired_comparison` (same seeds, same numbers); ``queries`` is the total over the sets.
    """
    from scipy import stats

    if len(base) != len(other):
        raise ValueError(f"paired scores must hold the same sets, got {len(base)} and {len(other)}")
    if not base:
        raise ValueError("no sets to compare")
    diffs = []
    for i, (b, o) in enumerate(zip(base, other, strict=True)):
        base_a, other_a = np.asarray(b, dtype=np.float64), np.asarray(o, dtype=np.float64)
        if base_a.shape != other_a.shape or base_a.ndim != 1:
            raise ValueError(f"set {i}: paired scores must be two 1-d arrays of one length, got {base_a.shape} "
                             f"and {other_a.shape}")
        if len(base_a) == 0:
            raise ValueError(f"set {i}: no queries to compare")
        diffs.append(other_a - base_a)
    n_sets, n = len(diffs), sum(len(d) for d in diffs)
    means = [float(d.mean()) for d in diffs]
    delta = float(np.mean(means))
    constant = [bool(np.all(d == d[0])) for d in diffs]
    varying = tuple(d for d, c in zip(diffs, constant, strict=True) if not c)
    fixed = sum(m for m, c in zip(means, constant, strict=True) if c)  # the same in every resample

    def macro(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return (fixed + sum(np.mean(x, axis=axis) for x in samples)) / n_sets

    if not varying:  # every resample has this mean (scipy would call the bootstrap degenerate)
        low, high = delta, delta
    else:
        ci = stats.bootstrap(varying, macro, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, paired=False, rng=np.random.default_rng(seed))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    weighted = np.concatenate([d * (n / (n_sets * len(d))) for d in diffs])  # their mean is the macro gain
    test = stats.permutation_test((weighted,), _mean, permutation_type="samples", alternative="two-sided",
                                  n_resamples=resamples, vectorized=True, rng=np.random.default_rng(seed + 1))
    return PairedComparison(delta, low, high, min(1.0, float(test.pvalue)), n, confidence)



def compare_to_baseline(per_query: dict[str, dict[str, np.ndarray]], baseline: str, metrics: Sequence[str], *,
                        resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """For every system but ``baseline``: ``{system: {metric: PairedComparison as a dict}}``.

    ``per_query[system][metric]`` holds one score per query, in the same query order for every system.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, scores in per_query.items():
        if name == baseline:
            continue
        out[name] = {m: paired_comparison(per_query[baseline][m], scores[m], resamples=resamples,
                                          confidence=confidence, seed=seed).as_dict()
                     for m in metrics if m in scores and m in per_query[baseline]}
    return out
