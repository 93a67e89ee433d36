"""The files of a mine folder: ``candidates.parquet``, ``corpus.parquet``, ``train.parquet``, ``stats.json``,
``scores.png``, ``config.yaml``, and the teacher scores behind ``embeddings.json``.

``koret mine`` writes them, ``koret filter`` (:mod:`koret.filter`) reads the candidates and writes a new
``train.parquet``, ``koret train`` and ``koret push`` read the records. Every file is written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from koret.config import MineConfig, dump_yaml
from koret.data import RetrievalData
from koret.encode import Embeddings
from koret.errors import KoretError
from koret.filter_rules import SOURCES, Candidates, FilterOutcome
from koret.io import write_json, write_parquet, write_text
from koret.report import plot_score_distributions, show, table
from koret.search import exact_scores

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


def write_candidates(out_dir: Path, cands: Candidates, data: RetrievalData, score_kind: str) -> None:
    """``corpus.parquet`` (id, doc_id, text, group) and ``candidates.parquet`` (one row per query; ``score_kind``,
    the kind of the scores that drive the filter, in its metadata)."""
    import pyarrow as pa

    write_parquet(out_dir / "corpus.parquet", pa.table({
        "id": pa.array(np.arange(len(data.corpus), dtype=np.int64)),
        "doc_id": pa.array(data.doc_ids, type=pa.string()),
        "text": pa.array(data.corpus, type=pa.string()),
        "group": pa.array(np.asarray(data.groups, dtype=np.int64)),
    }))
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


def _sources(table: Any) -> np.ndarray:
    """``candidate_sources`` (names per candidate) as the padded code matrix of :class:`Candidates`."""
    import pyarrow as pa

    codes = {name: code for code, name in SOURCES.items()}
    names = table.column("candidate_sources").combine_chunks()
    values = np.array([codes[n] for n in names.flatten().to_pylist()], dtype=np.int8)
    return _padded(pa.ListArray.from_arrays(names.offsets, pa.array(values)), 0, np.int8)


def write_filter_outputs(out_dir: Path, cfg: MineConfig, outcome: FilterOutcome, phases: dict[str, float],
                         started: float, score_kind: str | None) -> None:
    """``train.parquet``, ``stats.json``, ``scores.png``, ``config.yaml`` and the closing summary table.

    ``score_kind`` (what ``scores`` are, see :data:`SCORE_KINDS`; None: unknown) goes into train.parquet's
    metadata and stats.json."""
    import pyarrow as pa

    t = time.perf_counter()
    columns = dict(outcome.rows)
    table_cols = {name: pa.array(values, type=pa.string()) for name, values in columns.items() if name != "scores"}
    table_cols["scores"] = pa.array(columns["scores"], type=pa.list_(pa.float32()))
    write_parquet(out_dir / "train.parquet", _with_score_kind(pa.table(table_cols), score_kind))
    plot_score_distributions(out_dir / "scores.png", outcome.positive_scores, outcome.negative_scores,
                             f"{cfg.filter.strategy}: positives vs chosen negatives")
    write_text(out_dir / "config.yaml", dump_yaml(cfg))
    phases = {**phases, "write": time.perf_counter() - t}
    stats = outcome.stats
    stats["score_kind"] = score_kind
    stats["phases_seconds"] = phases
    stats["seconds_total"] = time.perf_counter() - started
    write_json(out_dir / "stats.json", stats)
    _summary(out_dir, stats)


def _summary(out_dir: Path, stats: dict[str, Any]) -> None:
    pos, neg = stats["scores"]["positive"], stats["scores"]["negative"]
    rows: list[list[Any]] = [
        ["(query, positive) rows in", stats["rows_in"]],
        ["rows written", stats["rows_out"]],
        ["negatives per row", stats["settings"]["num_negatives"]],
        ["candidates considered", stats["candidates_considered"]],
        *[[f"skipped: {what}", n] for what, n in (stats.get("data") or {}).get("skipped", {}).items()],
    ]
    rows += [[f"filtered: {rule}", n] for rule, n in stats["filtered"].items() if n]
    rows += [[f"negatives from {source}", n] for source, n in stats.get("negative_sources", {}).items()]
    rows += [
        [f"short rows ({stats['shortage']['policy']})", stats["shortage"]["rows"]],
        *([["padded negatives", stats["shortage"]["padded_negatives"]]]
          if stats["shortage"]["policy"] == "pad_random" else []),
        ["positive score p50", pos.get("p50", float("nan"))],
        ["negative score p50", neg.get("p50", float("nan"))],
    ]
    if "encode" in stats:
        enc = stats["encode"]["passages"]
        rows.append(["passage shards computed / reused", f"{enc['shards_computed']} / {enc['shards_reused']}"])
        if enc.get("texts_per_second"):
            rows.append(["passages/s", enc["texts_per_second"]])
    rows += [[f"seconds: {k}", v] for k, v in stats["phases_seconds"].items()]
    rows.append(["seconds: total", stats["seconds_total"]])
    show(table(f"koret: {out_dir}", ["", "value"], rows))
