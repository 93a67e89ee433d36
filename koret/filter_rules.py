"""False-negative filtering and negative sampling: pure functions of (positive score, candidate scores).

Strategies (``filter.strategy``), after NV-Retriever (Moreira et al., 2024, arXiv:2407.15831, section 4):

- ``naive``       TopK-Abs without threshold: the top candidates as they come;
- ``shifted``     TopK-shifted-N: skip the first ``range_min`` ranks;
- ``abs``         TopK-Abs: drop candidates scoring above ``max_score``;
- ``margin_pos``  TopK-MarginPos: drop a candidate scoring above ``positive - margin``;
- ``perc_pos``    TopK-PercPos (perc 0.95; koret's default until 2026-12-02, now ``naive`` with ``max_overlap``
  0.9): drop a candidate scoring above ``positive x perc``.
  For a negative positive score the threshold is ``positive - |positive| x (1 - perc)``, which keeps the
  threshold below the positive whatever its sign (the same convention as sentence-transformers'
  ``relative_margin``).

With ``scale: calibrated`` every threshold (``perc``, ``margin``, ``max_score``, ``min_score``) applies to the
teacher's calibrated scores instead of its raw ones (:mod:`koret.calibration`: 0 for a random pair, 1 for a
typical positive, measured by ``koret mine``), so that a setting means the same on every teacher; the scores
written to ``train.parquet`` stay raw.

Whatever the strategy, every known positive of the query (and any passage whose normalized text equals one) is
dropped; with ``max_overlap`` set, so is every candidate whose text nearly duplicates one of the query's positives
(character 3-gram overlap above ``max_overlap``, :mod:`koret.overlap`; computed from the texts beforehand into
:attr:`Candidates.overlap`), before ranks are counted; ``range_min``/``range_max`` bound the ranks considered,
``max_score``/``min_score`` apply when set.
Ranks count non-positive candidates only: ``range_min: 10`` skips the ten best passages that are not positives.
Thresholds are per (query, positive) row: a query with two positives has two rows with their own thresholds.

Each removed candidate is counted under the first rule that removes it, in the order of :data:`RULES`.
This module is a pure leaf: it imports nothing of koret but its errors and the calibration math. The ``koret filter`` stage that
re-applies these rules to an existing ``candidates.parquet`` is :mod:`koret.filter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from koret.calibration import Calibration
from koret.errors import KoretError

RULES = ("positive", "overlap", "range", "margin", "max_score", "min_score")


@dataclass(frozen=True)
class FilterSettings:
    """The ``filter`` section of a config, as plain values (see :class:`koret.config.FilterConfig`), with its
    defaults (tests hold them equal): ``FilterSettings()`` is the filter ``koret mine`` applies by default."""

    strategy: str = "naive"
    margin: float = 0.05
    perc: float = 0.95
    max_score: float | None = None
    min_score: float | None = None
    range_min: int = 0
    range_max: int | None = None
    num_negatives: int = 7
    sampling: str = "top"
    seed: int = 42
    on_shortage: str = "drop"
    scale: str = "raw"
    max_overlap: float | None = 0.9

    @classmethod
    def from_config(cls, cfg: Any) -> FilterSettings:
        fields = cls.__dataclass_fields__
        return cls(**{k: getattr(cfg, k) for k in fields})

    def check(self) -> None:
        """Cross-field checks the schema cannot express; raise one-line errors."""
        if self.strategy == "abs" and self.max_score is None:
            raise KoretError("filter.max_score: required by filter.strategy 'abs'", "e.g. --set filter.max_score=0.8")
        if self.strategy == "shifted" and self.range_min == 0:
            raise KoretError("filter.range_min: must be > 0 for filter.strategy 'shifted'",
                             "e.g. --set filter.range_min=10")
        if self.scale not in ("raw", "calibrated"):
            raise KoretError(f"filter.scale: unknown value {self.scale!r}", "use raw or calibrated")
        if self.max_overlap is not None and not 0.0 < self.max_overlap <= 1.0:
            raise KoretError(f"filter.max_overlap: {self.max_overlap} is not in (0, 1]",
                             "e.g. --set filter.max_overlap=0.5, or null to turn the guard off")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise KoretError(f"filter.range_max ({self.range_max}) must be larger than filter.range_min "
                             f"({self.range_min})")


def upper_threshold(positive: np.ndarray, settings: FilterSettings) -> np.ndarray:
    """Per-row score above which a candidate is a suspected false negative (``+inf`` when no such rule)."""
    positive = np.asarray(positive, dtype=np.float32)
    if settings.strategy == "perc_pos":
        return positive - np.abs(positive) * np.float32(1.0 - settings.perc)
    if settings.strategy == "margin_pos":
        return positive - np.float32(settings.margin)
    return np.full_like(positive, np.inf)


def on_scale(settings: FilterSettings, calibration: Calibration | None, *scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """The scores the thresholds apply to: raw, or calibrated (``settings.scale``) with the teacher's figures."""
    if settings.scale == "raw":
        return scores
    if calibration is None:
        raise KoretError("filter.scale: calibrated needs the teacher's calibration figures, which koret mine "
                         "writes to stats.json beside candidates.parquet; these candidates have none",
                         "mine again with this koret, or use filter.scale: raw")
    return tuple(calibration.apply(s) for s in scores)


def filter_candidates(
    positive_scores: np.ndarray,
    candidate_scores: np.ndarray,
    is_positive: np.ndarray,
    settings: FilterSettings,
    valid: np.ndarray | None = None,
    overlap: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Decide which candidates survive.

    Args:
        positive_scores: (R,) score of each row's positive.
        candidate_scores: (R, K) candidate scores in rank order (best first).
        is_positive: (R, K) True where the candidate is a known positive of the row's query.
        settings: the filter settings.
        valid: (R, K) False for padding (fewer than K candidates); default: finite scores.
        overlap: (R, K) text overlap of each candidate with the query's positives (:mod:`koret.overlap`);
            required when ``settings.max_overlap`` is set.

    Returns:
        ``keep`` (R, K) boolean mask, and the number of candidates removed by each rule in :data:`RULES`.
    """
    scores = np.asarray(candidate_scores, dtype=np.float32)
    valid = np.isfinite(scores) if valid is None else np.asarray(valid, dtype=bool)
    alive = valid.copy()
    counts: dict[str, int] = {}

    def drop(rule: str, mask: np.ndarray) -> None:
        hit = alive & mask
        counts[rule] = int(hit.sum())
        alive[hit] = False

    drop("positive", np.asarray(is_positive, dtype=bool))
    if settings.max_overlap is not None:
        if overlap is None:
            raise KoretError("filter.max_overlap: the candidates' text overlaps were not computed",
                             "compute them with koret.overlap.candidate_overlap, or set max_overlap=None to turn "
                             "the guard off")
        drop("overlap", np.asarray(overlap) > settings.max_overlap)
    else:
        counts["overlap"] = 0
    rank = np.cumsum(alive, axis=1) - 1  # rank among non-positive candidates
    out_of_range = rank < settings.range_min
    if settings.range_max is not None:
        out_of_range |= rank >= settings.range_max
    drop("range", out_of_range)
    threshold = upper_threshold(positive_scores, settings)[:, None]
    drop("margin", scores > threshold)
    drop("max_score", scores > settings.max_score if settings.max_score is not None else np.zeros_like(alive))
    drop("min_score", scores < settings.min_score if settings.min_score is not None else np.zeros_like(alive))
    return alive, counts


def row_uniforms(seed: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Uniform [0, 1) numbers for (row, column) pairs from a counter-based hash (SplitMix64) of (seed, global
    row index, column): row ``r`` draws the same numbers whichever process filters it, and whatever other rows
    are filtered with it."""
    z = (np.asarray(rows, dtype=np.uint64)[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)[None, :]
         + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_negatives(keep: np.ndarray, num: int, sampling: str, seed: int = 0,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """Columns of the chosen negatives per row, in rank order; -1 where a row has fewer than ``num`` survivors.

    ``top`` takes the best-ranked survivors; ``random`` draws uniformly among the survivors, keyed by ``seed``
    and each row's global index ``rows`` (default ``0..R-1``; see :func:`row_uniforms`).
    """
    n_rows, width = keep.shape
    if sampling == "top":
        key = np.where(keep, np.arange(width, dtype=np.float64)[None, :], np.inf)
    elif sampling == "random":
        rows = np.arange(n_rows) if rows is None else rows
        key = np.where(keep, row_uniforms(seed, rows, width), np.inf)
    else:
        raise KoretError(f"filter.sampling: unknown value {sampling!r}", "use top or random")
    take = min(num, width)
    cols = np.argsort(key, axis=1, kind="stable")[:, :take]
    picked_ok = np.take_along_axis(keep, cols, axis=1)
    cols = np.where(picked_ok, cols, width)  # sentinel sorts last
    cols = np.sort(cols, axis=1)  # rank order
    cols = np.where(cols == width, -1, cols)
    if take < num:
        cols = np.concatenate([cols, np.full((n_rows, num - take), -1, dtype=cols.dtype)], axis=1)
    return cols


def score_summary(values: np.ndarray) -> dict[str, float | int]:
    """Count, mean and quantiles of finite scores (what stats.json reports)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"count": 0}
    q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {"count": int(len(v)), "mean": float(v.mean()), "std": float(v.std()),
            **{name: float(x) for name, x in zip(("min", "p05", "p25", "p50", "p75", "p95", "max"), q, strict=True)}}


# --------------------------------------------------------------------------------------------- rows


@dataclass
class Candidates:
    """Per-query candidates as stored in ``candidates.parquet`` (see :mod:`koret.mine`)."""

    query_ids: list[str]
    queries: list[str]
    positive_ids: list[np.ndarray]
    positive_scores: list[np.ndarray]
    candidate_ids: np.ndarray  # (Q, K) int64, -1 padded
    candidate_scores: np.ndarray  # (Q, K) float32, -inf padded
    rescored: bool = False
    # when rescored: the teacher's scores, aligned with positive_ids / candidate_ids
    teacher_positive_scores: list[np.ndarray] | None = None
    teacher_candidate_scores: np.ndarray | None = None
    # where each candidate came from, aligned with candidate_ids: bit flags 1 dense, 2 lexical (0 padding)
    candidate_sources: np.ndarray | None = None
    # the scale of candidate_scores (koret.calibration), measured by koret mine over all the queries: not sliced
    calibration: Calibration | None = None
    # (Q, K) float32, aligned with candidate_ids: each candidate's largest character 3-gram overlap with one of its
    # query's positives (koret.overlap.candidate_overlap); computed from the texts where filter.max_overlap is set
    overlap: np.ndarray | None = None

    def take(self, queries: range) -> Candidates:
        """The candidates of a contiguous range of queries: every per-query field sliced, the flags kept."""
        from dataclasses import fields, replace

        sl = slice(queries.start, queries.stop)
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if f.name not in ("rescored", "calibration") and getattr(self, f.name) is not None})


@dataclass
class Choice:
    """What the filter chose for a range of queries, as numbers only (no texts), so that processes can each
    filter a range and the main process can join them (:func:`join_choices`) before building the rows."""

    row_query: np.ndarray  # (R,) global query index of every (query, positive) row
    row_positive: np.ndarray  # (R,) passage index of its positive
    positive_scores: np.ndarray  # (R,) float32
    negative_ids: np.ndarray  # (R, N) -1 where short
    negative_scores: np.ndarray  # (R, N) float32, nan where short
    kept: np.ndarray  # (R,) bool: the row goes to train.parquet
    survivors: np.ndarray  # (R,) candidates that passed every rule
    counts: dict[str, int]  # candidates removed by each rule
    short_rows: int
    padded: int
    candidates_considered: int
    sources: dict[str, int] | None  # chosen negatives by candidate source, over the kept rows


@dataclass
class FilterOutcome:
    rows: dict[str, list[Any]]  # columns of train.parquet
    stats: dict[str, Any]
    positive_scores: np.ndarray
    negative_scores: np.ndarray


ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def choose(cands: Candidates, groups: np.ndarray, settings: FilterSettings, score_fn: ScoreFn | None = None,
           first_query: int = 0, first_row: int = 0) -> Choice:
    """Expand per-query candidates into (query, positive) rows, filter, sample and pad: the numbers of the
    outcome. ``cands`` may be a range of the queries (:meth:`Candidates.take`) starting at query ``first_query``
    and row ``first_row``; random draws are keyed by global row index, so filtering ranges separately and
    joining them gives what filtering all at once gives.

    ``score_fn(query_indices, passage_indices)`` gives teacher scores of arbitrary pairs (global query indices);
    ``pad_random`` needs it to check that a random passage passes the filter (and to record its score).
    """
    settings.check()
    if settings.on_shortage == "pad_random" and (score_fn is None or cands.rescored):
        raise KoretError("filter.on_shortage: pad_random needs the teacher embeddings of the mine run "
                         "(embeddings.json and the cached shards) and no rescore.model",
                         "rerun koret mine, or use on_shortage: drop")
    n_pos = np.array([len(p) for p in cands.positive_ids], dtype=np.int64)
    if (n_pos == 0).any():
        bad = int(np.argmax(n_pos == 0))
        raise KoretError(f"candidates: query {cands.query_ids[bad]!r} has no positive")
    if not len(n_pos):  # a process given no queries
        return Choice(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                      np.zeros((0, settings.num_negatives), np.int64),
                      np.zeros((0, settings.num_negatives), np.float32), np.zeros(0, bool), np.zeros(0, np.int64),
                      dict.fromkeys(RULES, 0), 0, 0, 0,
                      None if cands.candidate_sources is None else dict.fromkeys([*SOURCES.values(), "random"], 0))
    row_query = np.repeat(np.arange(len(n_pos)), n_pos)
    row_positive = np.concatenate(cands.positive_ids).astype(np.int64)
    row_pos_score = np.concatenate(cands.positive_scores).astype(np.float32)
    global_rows = first_row + np.arange(len(row_query))
    ids = cands.candidate_ids[row_query]
    scores = cands.candidate_scores[row_query]
    valid = ids >= 0

    # every known positive of the query, by normalized-text group
    max_pos = int(n_pos.max())
    pos_groups = np.full((len(n_pos), max_pos), -2, dtype=np.int64)
    for q, pids in enumerate(cands.positive_ids):
        pos_groups[q, : len(pids)] = groups[np.asarray(pids, dtype=np.int64)]
    is_pos_q = (groups[np.clip(cands.candidate_ids, 0, None)][:, :, None] == pos_groups[:, None, :]).any(-1)
    is_pos = is_pos_q[row_query] & valid

    # the thresholds apply on settings.scale; what the rows record (neg_scores, positive_scores) stays raw
    scaled_pos, scaled = on_scale(settings, cands.calibration, row_pos_score, scores)
    overlap = None
    if settings.max_overlap is not None:
        if cands.overlap is None:
            raise KoretError("filter.max_overlap: the candidates carry no text overlaps",
                             "compute them with koret.overlap.candidate_overlap before filtering, or set "
                             "max_overlap=None to turn the guard off")
        overlap = cands.overlap[row_query]
    keep, counts = filter_candidates(scaled_pos, scaled, is_pos, settings, valid=valid, overlap=overlap)
    cols = sample_negatives(keep, settings.num_negatives, settings.sampling, settings.seed, global_rows)
    short = (cols < 0).any(axis=1)
    padded = 0
    neg_ids = np.where(cols >= 0, np.take_along_axis(ids, np.clip(cols, 0, None), 1), -1)
    neg_scores = np.where(cols >= 0, np.take_along_axis(scores, np.clip(cols, 0, None), 1), np.nan).astype(np.float32)

    if settings.on_shortage == "pad_random" and short.any():
        def local_score(qs: np.ndarray, ps: np.ndarray) -> np.ndarray:
            return score_fn(qs + first_query, ps)

        def to_scale(raw: np.ndarray) -> np.ndarray:
            return on_scale(settings, cands.calibration, raw)[0]

        padded = _pad_random(neg_ids, neg_scores, short, ids, valid, scaled_pos, row_query, pos_groups, groups,
                             settings, global_rows, local_score, to_scale)
        kept = ~(neg_ids < 0).any(axis=1)
    else:
        kept = ~short
    sources = None
    if cands.candidate_sources is not None:
        sources = negative_sources(cands.candidate_sources[row_query][kept], cols[kept], neg_ids[kept])
    return Choice(row_query + first_query, row_positive, row_pos_score, neg_ids, neg_scores, kept,
                  keep.sum(axis=1), counts, int(short.sum()), int(padded), int(valid.sum()), sources)


def join_choices(parts: list[Choice]) -> Choice:
    """The choices of consecutive query ranges, as one (what :func:`choose` gives for all the queries)."""
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    sources = None
    if parts[0].sources is not None:
        sources = {k: sum(p.sources[k] for p in parts) for k in parts[0].sources}  # type: ignore[index]
    return Choice(cat("row_query"), cat("row_positive"), cat("positive_scores"), cat("negative_ids"),
                  cat("negative_scores"), cat("kept"), cat("survivors"),
                  {rule: sum(p.counts[rule] for p in parts) for rule in parts[0].counts},
                  sum(p.short_rows for p in parts), sum(p.padded for p in parts),
                  sum(p.candidates_considered for p in parts), sources)


def apply_filter(cands: Candidates, corpus: list[str], groups: np.ndarray, settings: FilterSettings,
                 score_fn: ScoreFn | None = None, choice: Choice | None = None) -> FilterOutcome:
    """Filter, sample and pad (:func:`choose`, unless the processes of a run already did: ``choice``), then
    build the rows of ``train.parquet`` and the stats."""
    started = time.perf_counter()
    c = choice if choice is not None else choose(cands, groups, settings, score_fn)
    out_rows = np.flatnonzero(c.kept)
    row_query, neg_ids = c.row_query, c.negative_ids
    columns: dict[str, list[Any]] = {
        "anchor": [cands.queries[row_query[r]] for r in out_rows],
        "positive": [corpus[c.row_positive[r]] for r in out_rows],
    }
    for j in range(settings.num_negatives):
        columns[f"negative_{j + 1}"] = [corpus[neg_ids[r, j]] for r in out_rows]
    columns["scores"] = [[float(c.positive_scores[r]), *map(float, c.negative_scores[r])] for r in out_rows]

    chosen_neg = c.negative_scores[out_rows]
    stats: dict[str, Any] = {
        "rows_in": int(len(row_query)),
        "rows_out": int(len(out_rows)),
        "queries": int(len(cands.queries)),
        "candidates_considered": c.candidates_considered,
        "filtered": {
            "positive": c.counts["positive"],
            "near_duplicate": c.counts["overlap"],
            "range": c.counts["range"],
            settings.strategy if settings.strategy in ("perc_pos", "margin_pos") else "margin": c.counts["margin"],
            "max_score": c.counts["max_score"],
            "min_score": c.counts["min_score"],
        },
        "shortage": {"rows": c.short_rows, "policy": settings.on_shortage,
                     "dropped_rows": int(len(row_query) - len(out_rows)), "padded_negatives": c.padded},
        "survivors_per_row": score_summary(c.survivors),
        "scores": {"positive": score_summary(c.positive_scores[out_rows]), "negative": score_summary(chosen_neg)},
        "seconds": time.perf_counter() - started,
        "settings": settings.__dict__,
        "rescored": cands.rescored,
    }
    if c.sources is not None:
        stats["negative_sources"] = c.sources
    cal = cands.calibration
    if cal is not None:  # the figures, and the rows' scores on the calibrated scale (when it orders anything)
        stats["calibration"] = cal.as_dict()
        if cal.usable:
            stats["scores"]["positive_calibrated"] = score_summary(cal.apply(c.positive_scores[out_rows]))
            stats["scores"]["negative_calibrated"] = score_summary(cal.apply(chosen_neg))
    return FilterOutcome(columns, stats, c.positive_scores[out_rows], chosen_neg[np.isfinite(chosen_neg)])


DENSE, LEXICAL = 1, 2  # candidate sources, as bit flags
SOURCES = {DENSE: "dense", LEXICAL: "lexical", DENSE | LEXICAL: "both"}


def negative_sources(sources: np.ndarray, cols: np.ndarray, neg_ids: np.ndarray) -> dict[str, int]:
    """How many chosen negatives came from each candidate source (``random``: padded by ``pad_random``)."""
    picked = np.take_along_axis(sources, np.clip(cols, 0, None), 1)
    picked = np.where(cols >= 0, picked, 0)
    out = {name: int((picked == code).sum()) for code, name in SOURCES.items()}
    out["random"] = int(((cols < 0) & (neg_ids >= 0)).sum())
    return out


def _pad_random(neg_ids: np.ndarray, neg_scores: np.ndarray, short: np.ndarray, ids: np.ndarray,
                valid: np.ndarray, pos_score: np.ndarray, row_query: np.ndarray, pos_groups: np.ndarray,
                groups: np.ndarray, settings: FilterSettings, global_rows: np.ndarray, score_fn: ScoreFn,
                to_scale: Callable[[np.ndarray], np.ndarray] = lambda s: s) -> int:
    """Fill short rows with random corpus passages that pass the filter, scored exactly by ``score_fn``.

    Candidates are drawn from outside the row's candidate window and its query's positives; each draw is scored
    and kept only if it passes the same rules as mined candidates (``pos_score`` and the thresholds on the
    filter's scale, ``to_scale`` mapping a raw score onto it; the raw score is recorded). Rows still short after a bounded number of
    draws stay short (and are dropped). Each row draws from its own generator, seeded by (``settings.seed``, its
    global row index), so the draws do not depend on which other rows are padded with it.
    """
    n_corpus = len(groups)
    padded = 0
    upper = upper_threshold(pos_score, settings)
    for r in np.flatnonzero(short):
        rng = np.random.default_rng([settings.seed, int(global_rows[r])])
        taken = set(ids[r][valid[r]].tolist()) | set(neg_ids[r][neg_ids[r] >= 0].tolist())
        banned_groups = set(pos_groups[row_query[r]].tolist())
        missing = list(np.flatnonzero(neg_ids[r] < 0))
        for _ in range(8):
            if not missing:
                break
            draw = np.unique(rng.integers(n_corpus, size=4 * len(missing) + 8))
            draw = np.array([d for d in draw.tolist() if d not in taken and int(groups[d]) not in banned_groups],
                            dtype=np.int64)
            if not len(draw):
                continue
            drawn_scores = score_fn(np.full(len(draw), row_query[r]), draw)
            scaled = to_scale(drawn_scores)
            ok = scaled <= upper[r]
            if settings.max_score is not None:
                ok &= scaled <= settings.max_score
            if settings.min_score is not None:
                ok &= scaled >= settings.min_score
            for d, sc in zip(draw[ok].tolist(), drawn_scores[ok].tolist(), strict=True):
                if not missing:
                    break
                col = missing.pop(0)
                neg_ids[r, col], neg_scores[r, col] = d, sc
                taken.add(d)
                padded += 1
        if padded and not missing:
            order = np.argsort(-neg_scores[r], kind="stable")  # keep negatives in descending score order
            neg_ids[r], neg_scores[r] = neg_ids[r][order], neg_scores[r][order]
    return padded
