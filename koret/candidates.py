"""The files of a mine folder: ``candidates.parquet``, ``corpus.parquet``, ``train.parquet``, ``stats.json``,
``scores.png``, ``config.yaml``, and the teacher scores behind ``embeddings.json``.

``koret mine`` writes them, ``koret filter`` (:mod:`koret.filter`) reads the candidates and writes a new
``train.parquet``, ``koret train`` and ``koret push`` read the records. Every file is written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from koret.config import MineConfig, dump_yaml
from koret.data import RetrievalData
from koret.encode import Embeddings
from koret.errors import KoretError
from koret.filter_rules import SOURCES, Candidates, Choice, FilterOutcome, FilterSettings, apply_filter
from koret.io import write_json, write_parquet, write_text
from koret.report import plot_score_distributions, show, table
from koret.search import exact_scores
from koret.sources import SourceIndex, row_sources

# --------------------------------------------------------------------------------------------- score kinds

# What the scores that drive the filter and fill train.parquet's ``scores`` are, recorded in the metadata of
# candidates.parquet and train.parquet (key ``koret.score_kind``) and in stats.json, for loss.distill to put the
# teacher on its own scale (koret.training.distill): the teacher's cosine similarities (no rescore.model), or
# the rescore model's CrossEncoder.predict output, raw logits (Identity activation) or their sigmoid (the
# default activation of a one-label CrossEncoder saved without one), or through another activation.
TEACHER_COSINE = "teacher_cosine"
CROSS_ENCODER_LOGITS = "cross_encoder_logits"
CROSS_ENCODER_SIGMOID = "cross_encoder_sigmoid"
CROSS_ENCODER_OTHER = "cross_encoder_other"
SCORE_KINDS = (TEACHER_COSINE, CROSS_ENCODER_LOGITS, CROSS_ENCODER_SIGMOID, CROSS_ENCODER_OTHER)
SCORE_KIND_KEY = b"koret.score_kind"


def cross_encoder_score_kind(model: Any) -> str:
    """The kind of a CrossEncoder's ``predict`` scores, from the activation it applies to its logits."""
    import torch

    activation = getattr(model, "activation_fn", None)
    if isinstance(activation, torch.nn.Identity):
        return CROSS_ENCODER_LOGITS
    if isinstance(activation, torch.nn.Sigmoid):
        return CROSS_ENCODER_SIGMOID
    return CROSS_ENCODER_OTHER


def read_score_kind(path: str | Path) -> str | None:
    """The score kind recorded in a parquet file's metadata; None when it records none (a file written before
    koret recorded it, another tool's file) or is not a readable parquet file."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # not parquet, a folder, unreadable: the reader of the data reports those
        return None
    kind = metadata.get(SCORE_KIND_KEY)
    return kind.decode() if kind is not None else None


def _with_score_kind(table: Any, kind: str | None) -> Any:
    return table if kind is None else table.replace_schema_metadata(
        {**(table.schema.metadata or {}), SCORE_KIND_KEY: kind.encode()})


# --------------------------------------------------------------------------------------------- teacher scores


def score_fn(query_emb: np.ndarray, corpus_emb: Embeddings):
    """Teacher scores of (query, passage) pairs: the same exact float32 values the search returns."""

    def score(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
        return exact_scores(query_emb, corpus_emb, np.asarray(passages, dtype=np.int64), rows=queries)

    return score


def teacher_score_fn(mine_dir: Path):
    """Teacher scores of arbitrary (query, passage) pairs from the shards a mine run cached, or None."""
    import json

    from koret.encode import open_shard_files

    meta = mine_dir / "embeddings.json"
    if not meta.exists():
        return None
    files = json.loads(meta.read_text())
    passages, queries = open_shard_files(files["passages"]), open_shard_files(files["queries"])
    if passages is None or queries is None or not files["passages"]:
        return None
    return score_fn(queries.to_array(), passages)


# --------------------------------------------------------------------------------------------- files


def _list_column(arrays: list[np.ndarray], value_type: Any) -> Any:
    import pyarrow as pa

    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _rows(matrix: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    return [row[ok] for row, ok in zip(matrix, valid, strict=True)]


def write_candidates(out_dir: Path, cands: Candidates, data: RetrievalData, score_kind: str,
                     index: SourceIndex | None = None) -> None:
    """``corpus.parquet`` (id, doc_id, text, group) and ``candidates.parquet`` (one row per query; ``score_kind``,
    the kind of the scores that drive the filter, in its metadata). With several sources (``index``) the corpus
    also has ``sources`` (the sources whose passages hold each passage) and the candidates ``source``."""
    import pyarrow as pa

    corpus_cols = {
        "id": pa.array(np.arange(len(data.corpus), dtype=np.int64)),
        "doc_id": pa.array(data.doc_ids, type=pa.string()),
        "text": pa.array(data.corpus, type=pa.string()),
        "group": pa.array(np.asarray(data.groups, dtype=np.int64)),
    }
    if index is not None:
        corpus_cols["sources"] = pa.array(index.passage_sources(len(data.corpus)), type=pa.list_(pa.string()))
    write_parquet(out_dir / "corpus.parquet", pa.table(corpus_cols))
    valid = cands.candidate_ids >= 0
    teacher_pos = cands.teacher_positive_scores if cands.rescored else cands.positive_scores
    teacher_cand = cands.teacher_candidate_scores if cands.rescored else cands.candidate_scores
    cols: dict[str, Any] = {
        "query_id": pa.array(cands.query_ids, type=pa.string()),
        "query": pa.array(cands.queries, type=pa.string()),
        "positive_ids": _list_column(cands.positive_ids, pa.int64()),
        "candidate_ids": _list_column(_rows(cands.candidate_ids, valid), pa.int64()),
        "teacher_positive_scores": _list_column(teacher_pos, pa.float32()),
        "teacher_candidate_scores": _list_column(_rows(teacher_cand, valid), pa.float32()),
    }
    if cands.candidate_sources is not None:
        names = np.array(["", *(SOURCES[c] for c in sorted(SOURCES))], dtype=object)  # code -> name
        codes = _rows(cands.candidate_sources, valid)
        cols["candidate_sources"] = pa.array([names[c].tolist() for c in codes], type=pa.list_(pa.string()))
    if index is not None:
        names = np.asarray(index.names, dtype=object)
        cols["source"] = pa.array(names[index.query_sources()].tolist(), type=pa.string())
    if cands.rescored:
        cols["rescore_positive_scores"] = _list_column(cands.positive_scores, pa.float32())
        cols["rescore_candidate_scores"] = _list_column(_rows(cands.candidate_scores, valid), pa.float32())
    write_parquet(out_dir / "candidates.parquet", _with_score_kind(pa.table(cols), score_kind))


def _padded(list_array: Any, fill: float, dtype: Any) -> np.ndarray:
    import pyarrow as pa

    arr = list_array.combine_chunks() if isinstance(list_array, pa.ChunkedArray) else list_array
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), fill, dtype=dtype)
    mask = np.arange(width)[None, :] < lengths[:, None]
    out[mask] = values
    return out


def _ragged(list_array: Any, dtype: Any) -> list[np.ndarray]:
    import pyarrow as pa

    arr = list_array.combine_chunks() if isinstance(list_array, pa.ChunkedArray) else list_array
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return np.split(values, offsets[1:-1])


def read_candidates(path: Path) -> tuple[Candidates, list[str], np.ndarray]:
    """Read ``candidates.parquet`` and the ``corpus.parquet`` beside it (rescored scores win when present)."""
    import pyarrow.parquet as pq

    corpus_path = path.parent / "corpus.parquet"
    for p in (path, corpus_path):
        if not p.exists():
            raise KoretError(f"filter.candidates: {p} not found", "run koret mine first, or set filter.candidates")
    try:
        table = pq.read_table(path)
        corpus_table = pq.read_table(corpus_path)
    except Exception as exc:
        raise KoretError(f"filter.candidates: {path.parent}: unreadable or corrupt parquet "
                         f"({str(exc).splitlines()[0]})") from exc
    needed = {"query_id", "query", "positive_ids", "candidate_ids", "teacher_positive_scores",
              "teacher_candidate_scores"}
    missing = needed - set(table.column_names)
    if missing:
        raise KoretError(f"filter.candidates: {path}: missing columns {', '.join(sorted(missing))} "
                         f"(available: {', '.join(table.column_names)})", "was it written by koret mine?")
    rescored = "rescore_candidate_scores" in table.column_names
    prefix = "rescore" if rescored else "teacher"
    cands = Candidates(
        query_ids=table.column("query_id").to_pylist(),
        queries=table.column("query").to_pylist(),
        positive_ids=_ragged(table.column("positive_ids"), np.int64),
        positive_scores=_ragged(table.column(f"{prefix}_positive_scores"), np.float32),
        candidate_ids=_padded(table.column("candidate_ids"), -1, np.int64),
        candidate_scores=_padded(table.column(f"{prefix}_candidate_scores"), -np.inf, np.float32),
        rescored=rescored,
        candidate_sources=_sources(table) if "candidate_sources" in table.column_names else None,
    )
    corpus = corpus_table.column("text").to_pylist()
    groups = corpus_table.column("group").to_numpy()
    return cands, corpus, groups


def read_source_index(path: Path) -> SourceIndex | None:
    """The sources of a multi-source ``candidates.parquet`` (its ``source`` column and the ``sources`` column of the
    ``corpus.parquet`` beside it), or None for a one-source mine."""
    import pyarrow.parquet as pq

    if "source" not in pq.read_schema(path).names:
        return None
    corpus_path = path.parent / "corpus.parquet"
    if "sources" not in pq.read_schema(corpus_path).names:
        raise KoretError(f"filter.candidates: {corpus_path} has no 'sources' column, and {path.name} names sources",
                         "the two files come from different mine runs: mine again")
    return SourceIndex.from_columns(pq.read_table(path, columns=["source"]).column("source").to_pylist(),
                                    pq.read_table(corpus_path, columns=["sources"]).column("sources").to_pylist(),
                                    str(path))


SOURCES_KEY = b"koret.sources"  # train.parquet's metadata: the names of its sources (several-source mines)


def read_source_names(path: str | Path) -> list[str] | None:
    """The source names a mined parquet file records (several-source mines; its ``source`` column holds them),
    or None: a one-source mine, another tool's file, or not a readable parquet file."""
    import json

    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # not parquet, a folder, unreadable: the reader of the data reports those
        return None
    names = metadata.get(SOURCES_KEY)
    return list(json.loads(names)) if names is not None else None


@dataclass
class BySource:
    """The filter's outcome of each source of a several-source mine, and every kept row's source."""

    index: SourceIndex
    row_sources: list[str]  # train.parquet's source column
    outcomes: dict[str, FilterOutcome]


def filter_by_source(cands: Candidates, corpus: list[str], groups: np.ndarray, settings: FilterSettings,
                     index: SourceIndex, parts: list[Choice], joined: Choice) -> BySource:
    """Each source's outcome (its rows, stats and scores, from its part of the choice), and the rows' sources.
    Raises a one-line error naming a source of which no row is left, before anything is written."""
    outcomes = {}
    for s, (name, part) in enumerate(zip(index.names, parts, strict=True)):
        outcome = apply_filter(cands, corpus, groups, settings, choice=part)
        outcome.stats["queries"] = len(index.query_range(s))
        if not outcome.stats["rows_out"]:
            raise KoretError(f"data.sources.{name}: no row is left after filtering ({outcome.stats['rows_in']:,} "
                             f"rows in, {outcome.stats['shortage']['rows']:,} short of {settings.num_negatives} "
                             "negatives)", "lower filter.num_negatives, loosen the filter, or give this source "
                                           "more passages (its corpus)")
        outcomes[name] = outcome
    return BySource(index, row_sources(joined, index), outcomes)


def _source_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k not in ("settings", "seconds", "rescored", "calibration")}


def _sources(table: Any) -> np.ndarray:
    """``candidate_sources`` (names per candidate) as the padded code matrix of :class:`Candidates`."""
    import pyarrow as pa

    codes = {name: code for code, name in SOURCES.items()}
    names = table.column("candidate_sources").combine_chunks()
    values = np.array([codes[n] for n in names.flatten().to_pylist()], dtype=np.int8)
    return _padded(pa.ListArray.from_arrays(names.offsets, pa.array(values)), 0, np.int8)


def write_filter_outputs(out_dir: Path, cfg: MineConfig, outcome: FilterOutcome, phases: dict[str, float],
                         started: float, score_kind: str | None, by_source: BySource | None = None) -> None:
    """``train.parquet``, ``stats.json``, ``scores.png``, ``config.yaml`` and the closing summary table.

    ``score_kind`` (what ``scores`` are, see :data:`SCORE_KINDS`; None: unknown) goes into train.parquet's
    metadata and stats.json. With several sources (``by_source``) train.parquet has a ``source`` column (and the
    names in its metadata), stats.json a ``sources`` section, and each source its ``scores-<name>.png``."""
    import json

    import pyarrow as pa

    t = time.perf_counter()
    columns = dict(outcome.rows)
    table_cols = {name: pa.array(values, type=pa.string()) for name, values in columns.items() if name != "scores"}
    table_cols["scores"] = pa.array(columns["scores"], type=pa.list_(pa.float32()))
    train = pa.table(table_cols)
    if by_source is not None:
        train = train.append_column("source", pa.array(by_source.row_sources, type=pa.string()))
        train = train.replace_schema_metadata({**(train.schema.metadata or {}),
                                               SOURCES_KEY: json.dumps(by_source.index.names).encode()})
        for name, part in by_source.outcomes.items():
            plot_score_distributions(out_dir / f"scores-{name}.png", part.positive_scores, part.negative_scores,
                                     f"{name}: {cfg.filter.strategy}: positives vs chosen negatives")
        outcome.stats["sources"] = {name: {**_source_stats(part.stats), **outcome.stats.get("sources", {}).get(name, {})}
                                    for name, part in by_source.outcomes.items()}
    write_parquet(out_dir / "train.parquet", _with_score_kind(train, score_kind))
    plot_score_distributions(out_dir / "scores.png", outcome.positive_scores, outcome.negative_scores,
                             f"{cfg.filter.strategy}{' on the calibrated scale' if cfg.filter.scale == 'calibrated' else ''}"
                             ": positives vs chosen negatives",
                             calibration=outcome.stats.get("calibration"))
    write_text(out_dir / "config.yaml", dump_yaml(cfg))
    phases = {**phases, "write": time.perf_counter() - t}
    stats = outcome.stats
    stats["score_kind"] = score_kind
    stats["phases_seconds"] = phases
    stats["seconds_total"] = time.perf_counter() - started
    write_json(out_dir / "stats.json", stats)
    _summary(out_dir, stats)
    if stats.get("sources"):
        _source_summary(out_dir, stats)


def _calibration_rows(stats: dict[str, Any]) -> list[list[Any]]:
    """The summary's lines on the scale (koret.calibration): the figures, and the rows' scores on it."""
    cal = stats.get("calibration")
    if not cal:
        return []
    scores = stats["scores"]
    return [
        ["filter thresholds on scale", stats["settings"].get("scale", "raw")],
        [f"calibration: random-pair score mean ({cal['random_pairs']:,} pairs)", cal["random_mean"]],
        ["calibration: random-pair score std", cal["random_std"]],
        [f"calibration: positive score median ({cal['positive_rows']:,} rows in)", cal["positive_median"]],
        *[[f"{what} score p50, calibrated", scores[key]["p50"]]
          for what, key in (("positive", "positive_calibrated"), ("negative", "negative_calibrated"))
          if scores.get(key, {}).get("count")],
    ]


def _summary(out_dir: Path, stats: dict[str, Any]) -> None:
    pos, neg = stats["scores"]["positive"], stats["scores"]["negative"]
    rows: list[list[Any]] = [
        ["(query, positive) rows in", stats["rows_in"]],
        ["rows written", stats["rows_out"]],
        ["negatives per row", stats["settings"]["num_negatives"]],
        ["candidates considered", stats["candidates_considered"]],
        *[[f"skipped: {what}", n] for what, n in (stats.get("data") or {}).get("skipped", {}).items()],
    ]
    near = f"near-duplicate of a positive (text overlap > {stats['settings'].get('max_overlap')})"
    rows += [[f"filtered: {near if rule == 'near_duplicate' else rule}", n]
             for rule, n in stats["filtered"].items() if n]
    rows += [[f"negatives from {source}", n] for source, n in stats.get("negative_sources", {}).items()]
    rows += [
        [f"short rows ({stats['shortage']['policy']})", stats["shortage"]["rows"]],
        *([["padded negatives", stats["shortage"]["padded_negatives"]]]
          if stats["shortage"]["policy"] == "pad_random" else []),
        ["positive score p50", pos.get("p50", float("nan"))],
        ["negative score p50", neg.get("p50", float("nan"))],
        *_calibration_rows(stats),
    ]
    if "encode" in stats:
        enc = stats["encode"]["passages"]
        rows.append(["passage shards computed / reused", f"{enc['shards_computed']} / {enc['shards_reused']}"])
        if enc.get("texts_per_second"):
            rows.append(["passages/s", enc["texts_per_second"]])
    rows += [[f"seconds: {k}", v] for k, v in stats["phases_seconds"].items()]
    rows.append(["seconds: total", stats["seconds_total"]])
    show(table(f"koret: {out_dir}", ["", "value"], rows))


def _source_summary(out_dir: Path, stats: dict[str, Any]) -> None:
    """One line per source, and the total, of the figures each source has (stats.json's ``sources``)."""
    rule = stats["settings"]["strategy"]
    rule = rule if rule in ("perc_pos", "margin_pos") else "margin"
    rows = []
    for name, st in [*stats["sources"].items(), ("total", stats)]:
        rows.append([name, st["queries"], st["rows_in"], st["rows_out"], st["filtered"].get(rule, 0),
                     st["shortage"]["rows"], st["scores"]["positive"].get("p50", float("nan")),
                     st["scores"]["negative"].get("p50", float("nan"))])
    show(table(f"koret: {out_dir} by source", ["source", "queries", "rows in", "rows written", f"filtered: {rule}",
                                               "short rows", "positive score p50", "negative score p50"], rows))
