"""``koret filter``: re-apply filtering and sampling to an existing ``candidates.parquet``, without a model.

Reads ``filter.candidates`` (default ``<output.dir>/candidates.parquet``) and the ``corpus.parquet`` beside it,
applies the rules of :mod:`koret.filter_rules` and writes ``train.parquet``, ``stats.json``, ``scores.png`` and
``config.yaml`` into ``output.dir``: sweeping margins takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from koret.candidates import (
    TEACHER_COSINE,
    read_candidates,
    read_score_kind,
    teacher_score_fn,
    write_filter_outputs,
)
from koret.errors import KoretError
from koret.filter_rules import FilterSettings, apply_filter
from koret.io import read_record


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
    if settings.num_negatives > cands.candidate_ids.shape[1]:
        raise KoretError(f"filter.num_negatives ({settings.num_negatives}) is larger than the {cands.candidate_ids.shape[1]} "
                         f"candidates per query in {source}", "mine again with a larger search.top_k")
    score_fn = teacher_score_fn(source.parent) if settings.on_shortage == "pad_random" else None
    outcome = apply_filter(cands, corpus, groups, settings, score_fn)
    outcome.stats["candidates"] = str(source)
    previous = read_record(source.parent / "stats.json")  # what the candidates came from
    if previous:
        outcome.stats.update({k: previous[k] for k in ("data", "teacher", "search") if k in previous})
    # the kind of the scores is the candidates': recorded there, else teacher cosines when not rescored, else what
    # the stats.json beside them says (None, unknown, for rescored candidates written before koret recorded it)
    score_kind = read_score_kind(source) or (TEACHER_COSINE if not cands.rescored else
                                             (previous or {}).get("score_kind"))
    write_filter_outputs(Path(cfg.output.dir), cfg, outcome, phases={"filter": outcome.stats["seconds"]},
                         started=started, score_kind=score_kind)
    return outcome.stats
