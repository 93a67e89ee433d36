"""The teacher's own score scale: thresholds that mean the same on every teacher (``filter.scale: calibrated``).

A teacher's raw scores depend on the model: multilingual-e5-small scores random (query, passage) pairs about
0.75 and positives about 0.88, all-MiniLM-L6-v2 about 0.05 and 0.5. A raw threshold such as "95% of the
positive's score" (``perc_pos`` 0.95) is therefore a narrow band under the positive on one teacher and a wide one
on another. ``koret mine`` measures two figures of the scores that drive the filter:

- ``random_mean``: the mean score of a seeded sample of random (query, passage) pairs (:func:`random_pairs`;
  pairs whose passage is a known positive of the query are left out): what "unrelated" scores;
- ``positive_median``: the median score of the (query, positive) rows: what "relevant" typically scores;

and the calibrated score of a raw score ``s`` is ``(s - random_mean) / (positive_median - random_mean)``: 0 for
an unrelated pair, 1 for a typical positive (:meth:`Calibration.apply`). The map is affine and increasing, so it
keeps every ranking; a teacher whose scores are ``a x s + b`` (``a > 0``) of another's has the same calibrated
scores, and every threshold on the calibrated scale (``perc``, ``margin``, ``max_score``, ``min_score``) selects
the same negatives on both.

Pure: numpy only, no koret imports but the errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from koret.errors import KoretError

RANDOM_PAIRS = 1024  # random (query, passage) pairs scored per mine: the mean's standard error is std / 32
FORMULA = "(score - random_mean) / (positive_median - random_mean)"


@dataclass(frozen=True)
class Calibration:
    """The calibration figures of one teacher (or cross-encoder) on one mined data set."""

    random_mean: float
    random_std: float
    random_pairs: int
    positive_median: float
    positive_rows: int

    @property
    def gap(self) -> float:
        """How far a typical positive scores above a random pair: the unit of the calibrated scale."""
        return self.positive_median - self.random_mean

    @property
    def usable(self) -> bool:
        """False when the teacher scores its typical positive no higher than random pairs (an untrained or
        mismatched model): such a scale cannot order anything."""
        return bool(np.isfinite(self.gap) and self.gap > 0)

    def check(self) -> None:
        """Refuse an unusable scale with one line."""
        if not self.usable:
            raise KoretError(f"filter.scale: calibrated needs positives that score above random pairs; this "
                             f"teacher's median positive scores {self.positive_median:.4f} and its random pairs "
                             f"{self.random_mean:.4f} on average", "use filter.scale: raw, or another teacher")

    def apply(self, scores: Any) -> np.ndarray:
        """Calibrated scores (float32, same shape; ``-inf`` padding stays ``-inf``)."""
        self.check()
        s = np.asarray(scores, dtype=np.float64)
        return ((s - self.random_mean) / self.gap).astype(np.float32)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap, "formula": FORMULA}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Calibration:
        """The figures of :meth:`as_dict` (stats.json's ``calibration``); KeyError, TypeError or ValueError for a
        record that lacks one or holds something else than a number."""
        return cls(**{k: (int if k.endswith(("_pairs", "_rows")) else float)(record[k])
                      for k in cls.__dataclass_fields__})


def random_pairs(n_queries: int, n_passages: int, positive_ids: list[np.ndarray], groups: np.ndarray,
                 seed: int, n: int = RANDOM_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of ``n`` (query, passage) index pairs drawn uniformly, less those whose passage is a
    known positive of the query (or has a positive's normalized text, ``groups``). Sorted by query, then
    passage, so that a range of queries holds a contiguous run of the pairs."""
    if not n_queries or not n_passages:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 0xCA11B])
    rows = rng.integers(n_queries, size=n)
    passages = rng.integers(n_passages, size=n)
    groups = np.asarray(groups, dtype=np.int64)
    # only the sampled queries' positives are looked at: n checks, whatever the number of queries
    ok = np.array([not (groups[np.asarray(positive_ids[q], dtype=np.int64)] == groups[p]).any()
                   for q, p in zip(rows.tolist(), passages.tolist(), strict=True)], dtype=bool)
    rows, passages = rows[ok], passages[ok]
    order = np.lexsort((passages, rows))
    return rows[order].astype(np.int64), passages[order].astype(np.int64)


def calibrate(random_scores: Any, positive_scores: Any) -> Calibration | None:
    """The calibration figures from the scores of the random pairs and of every (query, positive) row; None when
    there is nothing to measure (no random pair left, no positive)."""
    r = np.asarray(random_scores, dtype=np.float64)
    r = r[np.isfinite(r)]
    p = np.asarray(positive_scores, dtype=np.float64)
    p = p[np.isfinite(p)]
    if not len(r) or not len(p):
        return None
    return Calibration(random_mean=float(r.mean()), random_std=float(r.std()), random_pairs=int(len(r)),
                       positive_median=float(np.median(p)), positive_rows=int(len(p)))
