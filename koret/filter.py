"""``koret filter``: re-apply filtering and sampling to an existing ``candidates.parquet``, without a model.

Reads ``filter.candidates`` (default ``<output.dir>/candidates.parquet``), the ``corpus.parquet`` beside it and the
calibration figures of the ``stats.json`` beside it (``filter.scale: calibrated``), applies the rules of
:mod:`koret.filter_rules` and writes ``train.parquet``, ``stats.json``, ``scores.png`` and ``config.yaml`` into
``output.dir``: sweeping margins takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from koret.calibration import Calibration
from koret.candidates import (
    TEACHER_COSINE,
    filter_by_source,
    read_candidates,
    read_score_kind,
    read_source_index,
    teacher_score_fn,
    write_filter_outputs,
)
from koret.errors import KoretError
from koret.filter_rules import FilterSettings, apply_filter, choose
from koret.io import read_record
from koret.overlap import candidate_overlap
from koret.sources import choose_by_source


def refilter(cfg: Any) -> dict[str, Any]:
    """``koret filter``: re-apply filtering and sampling to an existing ``candidates.parquet``, no model needed.

    Reads ``filter.candidates`` (default ``<output.dir>/candidates.parquet``) and the ``corpus.parquet`` beside
    it; writes ``train.parquet``, ``stats.json``, ``scores.png`` and ``config.yaml`` into ``output.dir``.
    Returns the stats.
    """
    started = time.perf_counter()
    settings = FilterSettings.from_config(cfg.filter)
    settings.check()
    source = Path(cfg.filter.candidates or Path(cfg.output.dir) / "candidates.parquet")
    if source.is_dir():
        source = source / "candidates.parquet"
    cands, corpus, groups = read_candidates(source)
    previous = read_record(source.parent / "stats.json")  # what the candidates came from
    if (previous or {}).get("calibration"):  # the scale koret mine measured (filter.scale: calibrated uses it)
        try:
            cands.calibration = Calibration.from_dict(previous["calibration"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an edited or foreign record
            if settings.scale == "calibrated":  # refused only where it is needed
                raise KoretError(f"filter.scale: calibrated: the calibration record of {source.parent / 'stats.json'} "
                                 f"is incomplete or not numbers ({type(exc).__name__}: {exc})",
                                 "mine again, or use filter.scale: raw") from None
    if settings.num_negatives > cands.candidate_ids.shape[1]:
        raise KoretError(f"filter.num_negatives ({settings.num_negatives}) is larger than the {cands.candidate_ids.shape[1]} "
                         f"candidates per query in {source}", "mine again with a larger search.top_k")
    phases: dict[str, float] = {}
    if settings.max_overlap is not None:  # the near-duplicate guard reads the texts
        t = time.perf_counter()
        cands.overlap = candidate_overlap(corpus, cands.positive_ids, cands.candidate_ids)
        phases["near_duplicates"] = time.perf_counter() - t
    score_fn = teacher_score_fn(source.parent) if settings.on_shortage == "pad_random" else None
    index = read_source_index(source)  # several sources: each source filtered within its own passages
    by_source = choice = None
    if index is not None:
        choice, parts = choose_by_source(cands, groups, settings, index, score_fn, _choose_range)
        by_source = filter_by_source(cands, corpus, groups, settings, index, parts, choice)
    outcome = apply_filter(cands, corpus, groups, settings, score_fn, choice=choice)
    outcome.stats["candidates"] = str(source)
    if previous:
        outcome.stats.update({k: previous[k] for k in ("data", "teacher", "search") if k in previous})
        if index is not None:  # each source's reading and search records
            outcome.stats["sources"] = {name: {k: v for k, v in (previous.get("sources") or {}).get(name, {}).items()
                                               if k in ("data", "top_k", "lexical")} for name in index.names}
    # the kind of the scores is the candidates': recorded there, else teacher cosines when not rescored, else what
    # the stats.json beside them says (None, unknown, for rescored candidates written before koret recorded it)
    score_kind = read_score_kind(source) or (TEACHER_COSINE if not cands.rescored else
                                             (previous or {}).get("score_kind"))
    write_filter_outputs(Path(cfg.output.dir), cfg, outcome, phases={**phases, "filter": outcome.stats["seconds"]},
                         started=started, score_kind=score_kind, by_source=by_source)
    return outcome.stats


def _choose_range(cands: Any, n_queries: int, groups: Any, settings: FilterSettings, score: Any, *,
                  first_query: int, first_row: int) -> Any:
    """One process's :func:`choose` with the signature :func:`koret.sources.choose_by_source` calls."""
    return choose(cands, groups, settings, score, first_query=first_query, first_row=first_row)
