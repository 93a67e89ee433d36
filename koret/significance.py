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

Both are seeded, so the same scores give the same interval and p-value on every run.
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
