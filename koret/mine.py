"""``koret mine``: hard negatives from a teacher, exact or approximate search, positive-aware filtering.

Phases:

1. read the data (any layout of :mod:`koret.data`), normalized and deduplicated;
2. encode passages and queries with the teacher, in cached resumable shards (:mod:`koret.encode`), split
   across processes under ``accelerate launch``;
3. search the top ``search.top_k`` passages per query (:mod:`koret.search`);
4. optionally rescore candidates and positives with a CrossEncoder (``rescore.model``);
5. filter and sample negatives (:mod:`koret.filter`) and write the outputs.

Outputs in ``output.dir`` (each written atomically): ``candidates.parquet``, ``corpus.parquet``,
``train.parquet`` (``anchor``, ``positive``, ``negative_1..N``, ``scores``), ``stats.json``, ``scores.png``,
``config.yaml``. ``koret filter`` re-runs phase 5 from ``candidates.parquet`` in seconds.

Python use::

    from koret.config import MineConfig, load_config
    from koret.mine import mine
    stats = mine(load_config(MineConfig, "configs/mine.yaml", ["filter.perc=0.9"]))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from koret import dist
from koret.config import MineConfig, dump_yaml
from koret.data import RetrievalData, load_from_config
from koret.encode import (
    Embeddings,
    EncodeSettings,
    encode_texts,
    load_cross_encoder,
    load_sentence_transformer,
    resolve_dtype,
    resolve_model_path,
)
from koret.errors import KoretError
from koret.filter import Candidates, FilterOutcome, FilterSettings, apply_filter
from koret.io import write_json, write_parquet, write_text
from koret.prompts import resolve_prompts
from koret.report import info, plot_score_distributions, show, table, warn
from koret.search import exact_scores, search


def mine(cfg: MineConfig) -> dict[str, Any]:
    """Run the whole mine stage; returns the stats (also written to ``stats.json``). See the module doc."""
    started = time.perf_counter()
    settings = FilterSettings.from_config(cfg.filter)
    settings.check()
    if not cfg.teacher.model:
        raise KoretError("teacher.model: required key is missing", "set a SentenceTransformer Hub id or folder")
    out_dir = Path(cfg.output.dir)
    phases: dict[str, float] = {}
    # fail fast on model references, before any data is read or encoded
    resolve_model_path(cfg.teacher.model, "teacher.model")
    if cfg.rescore.model:
        resolve_model_path(cfg.rescore.model, "rescore.model")
        if settings.on_shortage == "pad_random":
            raise KoretError("filter.on_shortage: pad_random cannot be combined with rescore.model "
                             "(padded passages would carry teacher scores among cross-encoder scores)",
                             "use on_shortage: drop")

    t = time.perf_counter()
    data = load_from_config(cfg.data).with_positives_only()
    phases["read"] = time.perf_counter() - t
    info(f"[bold]data[/bold] {data.source} ({data.format}): {len(data.queries):,} queries, "
         f"{len(data.pairs):,} (query, positive) rows, {len(data.corpus):,} passages")
    for note in data.notes:
        info(f"  {note}")
    top_k = cfg.search.top_k
    if top_k > len(data.corpus) - 1:
        top_k = max(1, len(data.corpus) - 1)
        warn(f"search.top_k ({cfg.search.top_k}) is larger than the corpus allows; using {top_k}")
    if settings.num_negatives > top_k:
        raise KoretError(f"filter.num_negatives ({settings.num_negatives}) is larger than the {top_k} candidates "
                         f"this corpus of {len(data.corpus)} passages can give")

    t = time.perf_counter()
    model = load_sentence_transformer(cfg.teacher.model, device=cfg.teacher.device, dtype=cfg.teacher.dtype,
                                      max_seq_length=cfg.teacher.max_seq_length)
    phases["load_teacher"] = time.perf_counter() - t
    q_prompt, p_prompt = resolve_prompts(model.prompts, cfg.teacher, "teacher")

    enc = EncodeSettings(model_name=cfg.teacher.model, batch_size=cfg.teacher.batch_size,
                         max_seq_length=cfg.teacher.max_seq_length,
                         dtype=resolve_dtype(cfg.teacher.dtype, str(model.device)),
                         normalize=cfg.data.normalize, shard_size=cfg.encode.shard_size, cache_dir=cfg.cache_dir)
    corpus_emb, corpus_stats = encode_texts(model, data.corpus, p_prompt, enc, "encode passages")
    query_emb_s, query_stats = encode_texts(model, data.queries, q_prompt, enc, "encode queries")
    phases["encode"] = corpus_stats["seconds"] + query_stats["seconds"]
    teacher_max_len = model.max_seq_length
    del model
    if not dist.is_main():
        return {}
    query_emb = query_emb_s.to_array()

    result = search(query_emb, corpus_emb.shards, top_k, backend=cfg.search.backend, index=cfg.search.index,
                    query_chunk_size=cfg.search.query_chunk_size, nprobe=cfg.search.nprobe,
                    train_sample=cfg.search.train_sample, description="search", seed=cfg.filter.seed,
                    precision=cfg.search.precision)
    phases["search"] = result.seconds

    positive_ids = [np.array(sorted(d for d, g in rel.items() if g > 0), dtype=np.int64) for rel in data.qrels]
    flat_pos = np.concatenate(positive_ids)
    positive_scores = np.split(_score_fn(query_emb, corpus_emb)(np.repeat(np.arange(len(positive_ids)),
                                                                          [len(p) for p in positive_ids]), flat_pos),
                               np.cumsum([len(p) for p in positive_ids])[:-1])
    cands = Candidates(data.query_ids, data.queries, positive_ids, positive_scores, result.ids, result.scores)
    if cfg.rescore.model:
        t = time.perf_counter()
        cands = rescore(cands, data.corpus, cfg)
        phases["rescore"] = time.perf_counter() - t

    t = time.perf_counter()
    write_candidates(out_dir, cands, data)
    phases["write_candidates"] = time.perf_counter() - t
    write_json(out_dir / "embeddings.json", {"dim": corpus_emb.dim, "passages": corpus_emb.files,
                                             "queries": query_emb_s.files})
    outcome = apply_filter(cands, data.corpus, np.asarray(data.groups, dtype=np.int64), settings,
                           _score_fn(query_emb, corpus_emb))
    phases["filter"] = outcome.stats["seconds"]
    outcome.stats.update({
        "data": {"source": data.source, "format": data.format, "fingerprint": data.fingerprint(),
                 "queries": len(data.queries), "pairs": len(data.pairs), "passages": len(data.corpus),
                 "positive_passages": data.num_positive_passages, "skipped": data.counts},
        "teacher": {"model": cfg.teacher.model, "query_prompt": q_prompt, "passage_prompt": p_prompt,
                    "dtype": enc.dtype, "max_seq_length": teacher_max_len,
                    "dim": corpus_emb.dim},
        "encode": {"passages": corpus_stats, "queries": query_stats},
        "search": {"backend": result.backend, "index": cfg.search.index, "top_k": top_k,
                   "seconds": result.seconds, "queries_per_second": len(query_emb) / max(result.seconds, 1e-9)},
    })
    write_filter_outputs(out_dir, cfg, outcome, phases, started=started)
    return outcome.stats


def _score_fn(query_emb: np.ndarray, corpus_emb: Embeddings):
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
    return _score_fn(queries.to_array(), passages)


def rescore(cands: Candidates, corpus: list[str], cfg: MineConfig) -> Candidates:
    """Score every (query, candidate) and (query, positive) pair with the CrossEncoder, batched across queries."""
    from koret.report import progress

    ce = load_cross_encoder(cfg.rescore.model, device=cfg.teacher.device, max_length=cfg.rescore.max_length)
    ids = cands.candidate_ids
    pairs: list[tuple[str, str]] = []
    for q, text in enumerate(cands.queries):
        pairs.extend((text, corpus[d]) for d in ids[q] if d >= 0)
        pairs.extend((text, corpus[d]) for d in cands.positive_ids[q])
    scores = np.empty(len(pairs), dtype=np.float32)
    step = cfg.rescore.batch_size * 16
    with progress() as bar:
        task = bar.add_task("rescore", total=len(pairs), unit="pairs")
        for start in range(0, len(pairs), step):
            chunk = pairs[start:start + step]
            scores[start:start + len(chunk)] = np.asarray(
                ce.predict(chunk, batch_size=cfg.rescore.batch_size, show_progress_bar=False), dtype=np.float32
            ).reshape(-1)
            bar.update(task, advance=len(chunk))
    new_cand = np.full(ids.shape, -np.inf, dtype=np.float32)
    new_pos: list[np.ndarray] = []
    pos = 0
    for q in range(len(cands.queries)):
        valid = ids[q] >= 0
        n_valid = int(valid.sum())
        row = scores[pos:pos + n_valid]
        pos += n_valid
        new_cand[q, np.flatnonzero(valid)] = row
        n_pos = len(cands.positive_ids[q])
        new_pos.append(scores[pos:pos + n_pos].copy())
        pos += n_pos
    # candidates are re-ranked by the rescored score, best first
    order = np.argsort(-new_cand, axis=1, kind="stable")
    return Candidates(cands.query_ids, cands.queries, cands.positive_ids, new_pos,
                      np.take_along_axis(ids, order, 1), np.take_along_axis(new_cand, order, 1), rescored=True,
                      teacher_positive_scores=cands.positive_scores,
                      teacher_candidate_scores=np.take_along_axis(cands.candidate_scores, order, 1))


# --------------------------------------------------------------------------------------------- files


def _list_column(arrays: list[np.ndarray], value_type: Any) -> Any:
    import pyarrow as pa

    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _rows(matrix: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    return [row[ok] for row, ok in zip(matrix, valid, strict=True)]


def write_candidates(out_dir: Path, cands: Candidates, data: RetrievalData) -> None:
    """``corpus.parquet`` (id, doc_id, text, group) and ``candidates.parquet`` (one row per query)."""
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
    if cands.rescored:
        cols["rescore_positive_scores"] = _list_column(cands.positive_scores, pa.float32())
        cols["rescore_candidate_scores"] = _list_column(_rows(cands.candidate_scores, valid), pa.float32())
    write_parquet(out_dir / "candidates.parquet", pa.table(cols))


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
    )
    corpus = corpus_table.column("text").to_pylist()
    groups = corpus_table.column("group").to_numpy()
    return cands, corpus, groups


def write_filter_outputs(out_dir: Path, cfg: MineConfig, outcome: FilterOutcome, phases: dict[str, float],
                         started: float) -> None:
    """``train.parquet``, ``stats.json``, ``scores.png``, ``config.yaml`` and the closing summary table."""
    import pyarrow as pa

    t = time.perf_counter()
    columns = dict(outcome.rows)
    table_cols = {name: pa.array(values, type=pa.string()) for name, values in columns.items() if name != "scores"}
    table_cols["scores"] = pa.array(columns["scores"], type=pa.list_(pa.float32()))
    write_parquet(out_dir / "train.parquet", pa.table(table_cols))
    plot_score_distributions(out_dir / "scores.png", outcome.positive_scores, outcome.negative_scores,
                             f"{cfg.filter.strategy}: positives vs chosen negatives")
    write_text(out_dir / "config.yaml", dump_yaml(cfg))
    phases = {**phases, "write": time.perf_counter() - t}
    stats = outcome.stats
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
