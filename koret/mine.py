"""``koret mine``: hard negatives from a teacher, exact or approximate search, positive-aware filtering.

Phases:

1. read the data (any layout of :mod:`koret.data`), normalized and deduplicated;
2. encode passages and queries with the teacher, in cached resumable shards (:mod:`koret.encode`); under
   ``--num-processes`` / torchrun / ``accelerate launch`` each process encodes and keeps one contiguous slice
   of the corpus;
3. search the top ``search.top_k`` passages per query (:mod:`koret.search`; each process its slice, merged
   exactly on the main process by :mod:`koret.sharded_search`), and with ``search.lexical`` add
   the BM25 top ``search.lexical.top_k`` over Korean morphemes, each scored by the teacher (:mod:`koret.lexical`);
4. optionally rescore candidates and positives with a CrossEncoder (``rescore.model``), each process taking a
   range of queries;
5. filter and sample negatives (:mod:`koret.filter_rules`), each process taking a range of queries, and write the
   outputs from the main process.

With ``data.sources`` (:mod:`koret.sources`) the sources are read into one corpus (a text in several sources is
encoded once) and each source's queries are searched and filtered within its own passages; the outputs keep each
row's source and stats.json counts per source.

Outputs in ``output.dir`` (each written atomically): ``candidates.parquet``, ``corpus.parquet``,
``train.parquet`` (``anchor``, ``positive``, ``negative_1..N``, ``scores``), ``stats.json``, ``scores.png``,
``config.yaml``. ``score_kind``, in stats.json and in both parquet files' metadata, says what the scores are (the
teacher's cosines, or the cross-encoder's logits or their sigmoid: :data:`koret.candidates.SCORE_KINDS`), which
``loss.distill`` reads. ``koret filter`` re-runs phase 5 from ``candidates.parquet`` in seconds.

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
from koret.calibration import calibrate, random_pairs
from koret.candidates import (
    TEACHER_COSINE,
    cross_encoder_score_kind,
    filter_by_source,
    score_fn,
    write_candidates,
    write_filter_outputs,
)
from koret.config import MineConfig
from koret.data import load_section
from koret.encode import (
    EncodeSettings,
    encode_texts,
    load_cross_encoder,
    load_sentence_transformer,
    open_shard_files,
    resolve_dtype,
    resolve_model_path,
    score_pairs,
)
from koret.errors import KoretError
from koret.filter_rules import Candidates, Choice, FilterSettings, apply_filter, choose, join_choices
from koret.io import write_json
from koret.lexical import LexicalSettings, check_lexical_available, lexical_candidates, union_candidates
from koret.overlap import candidate_overlap
from koret.prompts import resolve_prompts
from koret.report import info, warn
from koret.search import SearchResult
from koret.sharded_search import pair_scores, search_slices
from koret.sources import SourceIndex, choose_by_source, load_mine_sources


def mine(cfg: MineConfig) -> dict[str, Any]:
    """Run the whole mine stage; returns the stats (also written to ``stats.json``). See the module doc."""
    started = time.perf_counter()
    settings = FilterSettings.from_config(cfg.filter)
    settings.check()
    if not cfg.teacher.model:
        raise KoretError("teacher.model: required key is missing", "set a SentenceTransformer Hub id or folder")
    if dist.world_size() > 1 and not cfg.cache_dir:  # checked before the corpus is encoded, not after
        raise KoretError(f"cache_dir: not set, and the {dist.world_size()} processes of this run share the corpus "
                         "and query embeddings through it", "set cache_dir to a folder every process sees")
    out_dir = Path(cfg.output.dir)
    phases: dict[str, float] = {}
    # fail fast on model references, before any data is read or encoded
    resolve_model_path(cfg.teacher.model, "teacher.model")
    if cfg.search.lexical:
        check_lexical_available()
    if cfg.rescore.model:
        resolve_model_path(cfg.rescore.model, "rescore.model")
        if settings.on_shortage == "pad_random":
            raise KoretError("filter.on_shortage: pad_random cannot be combined with rescore.model "
                             "(padded passages would carry teacher scores among cross-encoder scores)",
                             "use on_shortage: drop")

    t = time.perf_counter()
    index, source_records = None, {}  # several sources (data.sources): which queries and passages are whose
    if cfg.data.sources:
        data, index, source_records = load_mine_sources(cfg.data)
    else:
        data = load_section(cfg.data).with_positives_only()
    phases["read"] = time.perf_counter() - t
    info(f"{data.source} ({data.format}): {len(data.queries):,} queries, "
         f"{len(data.pairs):,} (query, positive) rows, {len(data.corpus):,} passages", lead="data")
    for note in data.notes:
        info(f"  {note}")
    if index is None:
        top_k = candidate_depth(cfg.search.top_k, settings.num_negatives, len(data.corpus))
    else:  # each source searches its own passages
        top_ks = [candidate_depth(cfg.search.top_k, settings.num_negatives, len(pool), name)
                  for name, pool in zip(index.names, index.passages, strict=True)]
        top_k = max(top_ks)

    t = time.perf_counter()
    model = load_sentence_transformer(cfg.teacher.model, device=cfg.teacher.device, dtype=cfg.teacher.dtype,
                                      max_seq_length=cfg.teacher.max_seq_length)
    phases["load_teacher"] = time.perf_counter() - t
    q_prompt, p_prompt = resolve_prompts(model.prompts, cfg.teacher, "teacher")

    enc = EncodeSettings(model_name=cfg.teacher.model, batch_size=cfg.teacher.batch_size,
                         max_seq_length=cfg.teacher.max_seq_length,
                         dtype=resolve_dtype(cfg.teacher.dtype, str(model.device)),
                         normalize=cfg.data.normalize, shard_size=cfg.encode.shard_size, cache_dir=cfg.cache_dir,
                         verify=cfg.encode.verify, storage=cfg.encode.dtype)
    # each process keeps only its slice of the corpus; every process has all the queries
    corpus_emb, corpus_stats = encode_texts(model, data.corpus, p_prompt, enc, "encode passages", keep="slice")
    query_emb_s, query_stats = encode_texts(model, data.queries, q_prompt, enc, "encode queries")
    phases["encode"] = corpus_stats["seconds"] + query_stats["seconds"]
    teacher_max_len, dim = model.max_seq_length, corpus_emb.dim
    del model
    query_emb = query_emb_s.to_array()

    # search: every process its slice, the main process merges (collective, like the scoring below)
    search_kwargs = dict(backend=cfg.search.backend, index=cfg.search.index,
                         query_chunk_size=cfg.search.query_chunk_size, nprobe=cfg.search.nprobe,
                         train_sample=cfg.search.train_sample, description="search", seed=cfg.filter.seed,
                         precision=cfg.search.precision)
    if index is None:
        result = search_slices(query_emb, corpus_emb, len(data.corpus), top_k, **search_kwargs)
    else:
        result = search_by_source(query_emb, corpus_emb, index, top_ks, **search_kwargs)
    positive_ids = [np.array(sorted(d for d, g in rel.items() if g > 0), dtype=np.int64) for rel in data.qrels]
    flat_pos = np.concatenate(positive_ids)
    flat_pos_scores = pair_scores(query_emb, corpus_emb, np.repeat(np.arange(len(positive_ids)),
                                                                   [len(p) for p in positive_ids]), flat_pos)
    # the calibration figures (koret.calibration): scores of a seeded sample of random (query, passage) pairs, the
    # teacher's (collective) or, with rescore.model, the cross-encoder's (scored with the candidates)
    random_q, random_p = random_pairs(len(data.queries), len(data.corpus), positive_ids, data.groups, cfg.filter.seed)
    random_scores = None if cfg.rescore.model else pair_scores(query_emb, corpus_emb, random_q, random_p)
    lexical_ids = lexical_scores = lexical_stats = None
    if cfg.search.lexical:  # BM25: index on the main process, queries spread over the processes (collective);
        t = time.perf_counter()  # the teacher scores its candidates where they live
        lexical_settings = LexicalSettings(**cfg.search.lexical.model_dump())
        if index is None:
            lexical_ids, found_stats = lexical_candidates(data.corpus, data.queries, lexical_settings, cfg.cache_dir)
        else:
            lexical_ids, found_stats = lexical_by_source(data.corpus, data.queries, index, lexical_settings,
                                                         cfg.cache_dir)
        lexical_scores = pair_scores(query_emb, corpus_emb, np.repeat(np.arange(len(lexical_ids)),
                                                                      lexical_ids.shape[1]), lexical_ids.ravel())
        if dist.is_main():
            lexical_stats = found_stats
            phases["lexical"] = time.perf_counter() - t
    cand_ids = cand_scores = sources = None
    if dist.is_main():
        phases["search"] = result.seconds
        cand_ids, cand_scores = result.ids, result.scores
        if lexical_ids is not None:
            cand_ids, cand_scores, sources = union_candidates(result.ids, result.scores, lexical_ids,
                                                              lexical_scores.reshape(lexical_ids.shape))
            lexical_stats["candidates_per_query"] = float((cand_ids >= 0).sum(axis=1).mean())
    rescored, score_kind = None, TEACHER_COSINE
    if cfg.rescore.model:  # every process scores the pairs of its range of queries with the CrossEncoder
        t = time.perf_counter()
        rescored = rescore_pairs(dist.broadcast_from_main(cand_ids), positive_ids, data.queries, data.corpus, cfg,
                                 (random_q, random_p))
        phases["rescore"] = time.perf_counter() - t
    cands = None
    if dist.is_main():
        positive_scores = np.split(flat_pos_scores, np.cumsum([len(p) for p in positive_ids])[:-1])
        cands = Candidates(data.query_ids, data.queries, positive_ids, positive_scores, cand_ids, cand_scores,
                           candidate_sources=sources)
        if rescored is not None:
            new_cand, new_pos, score_kind, random_scores = rescored
            cands = apply_rescore(cands, new_cand, new_pos)
        cands.calibration = calibrate(random_scores, np.concatenate(cands.positive_scores))
        if settings.max_overlap is not None:  # the near-duplicate guard reads the texts
            t = time.perf_counter()
            cands.overlap = candidate_overlap(data.corpus, cands.positive_ids, cands.candidate_ids)
            phases["near_duplicates"] = time.perf_counter() - t

    # filter: every process a range of queries; the whole corpus memory-mapped (pad_random reads the rows it draws)
    t = time.perf_counter()
    all_passages = open_shard_files(corpus_emb.files) if corpus_emb.files else corpus_emb
    groups = np.asarray(data.groups, dtype=np.int64)
    score = score_fn(query_emb, all_passages)
    if index is None:
        choice = choose_by_query_range(cands, len(data.queries), groups, settings, score)
    else:  # source by source, each within its own passages
        choice, parts = choose_by_source(cands, groups, settings, index, score, choose_by_query_range)
    if not dist.is_main():
        return {}
    filter_seconds = time.perf_counter() - t
    by_source = None
    if index is not None:  # checked before anything is written: a source left without rows is an error
        by_source = filter_by_source(cands, data.corpus, groups, settings, index, parts, choice)

    t = time.perf_counter()
    write_candidates(out_dir, cands, data, score_kind, index)
    phases["write_candidates"] = time.perf_counter() - t
    write_json(out_dir / "embeddings.json", {"dim": dim, "passages": corpus_emb.files,
                                             "queries": query_emb_s.files})
    outcome = apply_filter(cands, data.corpus, groups, settings, choice=choice)
    phases["filter"] = filter_seconds + outcome.stats["seconds"]
    outcome.stats.update({
        "data": {"source": data.source, "format": data.format, "fingerprint": data.fingerprint(),
                 "queries": len(data.queries), "pairs": len(data.pairs), "passages": len(data.corpus),
                 "positive_passages": data.num_positive_passages, "skipped": data.counts},
        "teacher": {"model": cfg.teacher.model, "query_prompt": q_prompt, "passage_prompt": p_prompt,
                    "dtype": enc.dtype, "max_seq_length": teacher_max_len,
                    "dim": dim},
        "encode": {"passages": corpus_stats, "queries": query_stats},
        "search": {"backend": result.backend, "index": cfg.search.index, "top_k": top_k,
                   "seconds": result.seconds, "queries_per_second": len(query_emb) / max(result.seconds, 1e-9),
                   **({"lexical": lexical_stats} if lexical_stats else {})},
    })
    if index is not None:
        outcome.stats["sources"] = {name: {"data": source_records[name], "top_k": k}
                                    for name, k in zip(index.names, top_ks, strict=True)}
        if lexical_stats:
            per_source = lexical_stats.pop("sources")
            outcome.stats["sources"] = {name: {**st, "lexical": per_source[name]}
                                        for name, st in outcome.stats["sources"].items()}
    write_filter_outputs(out_dir, cfg, outcome, phases, started=started, score_kind=score_kind, by_source=by_source)
    return outcome.stats


def candidate_depth(top_k: int, num_negatives: int, passages: int, source: str | None = None) -> int:
    """``search.top_k``, lowered (with a warning) to what a corpus of ``passages`` passages can give; a one-line
    error when that is fewer than ``filter.num_negatives``."""
    where = f"source {source}: " if source else ""
    depth = top_k
    if depth > passages - 1:
        depth = max(1, passages - 1)
        warn(f"{where}search.top_k ({top_k}) is larger than the corpus allows; using {depth}")
    if num_negatives > depth:
        key = f"data.sources.{source}: " if source else ""
        raise KoretError(f"{key}filter.num_negatives ({num_negatives}) is larger than the {depth} candidates "
                         f"this corpus of {passages} passages can give")
    return depth


def search_by_source(queries: np.ndarray, local: Any, sources: SourceIndex, top_ks: list[int],
                     **search_kwargs: Any) -> SearchResult | None:
    """Each source's queries searched within its own passages (:func:`search_slices` with the source's pool as
    its subset), as one result over all the queries (global ids, -1 / -inf padded to the widest source).
    Collective; the result on the main process, None on the others."""
    parts = []
    for s, (pool, k) in enumerate(zip(sources.passages, top_ks, strict=True)):
        r = sources.query_range(s)
        parts.append(search_slices(queries[r.start:r.stop], local, len(pool), k, subset=pool, **search_kwargs))
    if not dist.is_main():
        return None
    width = max(p.ids.shape[1] for p in parts)
    ids = np.concatenate([np.pad(p.ids, ((0, 0), (0, width - p.ids.shape[1])), constant_values=-1) for p in parts])
    scores = np.concatenate([np.pad(p.scores, ((0, 0), (0, width - p.scores.shape[1])), constant_values=-np.inf)
                             for p in parts])
    return SearchResult(scores, ids, parts[0].backend, sum(p.seconds for p in parts), parts[0].precision,
                        sum(p.rechecked for p in parts))


def lexical_by_source(corpus: list[str], queries: list[str], index: SourceIndex, settings: LexicalSettings,
                      cache_dir: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """BM25 candidates of each source's queries within its own passages (:func:`lexical_candidates` over the
    source's pool), with global ids, -1 padded to the widest source; and the stats of each source. Collective."""
    parts, stats = [], {}
    for s, (name, pool) in enumerate(zip(index.names, index.passages, strict=True)):
        r = index.query_range(s)
        ids, stats[name] = lexical_candidates([corpus[p] for p in pool.tolist()], queries[r.start:r.stop], settings,
                                              cache_dir)
        parts.append(np.where(ids >= 0, pool[np.maximum(ids, 0)], -1))
    width = max(p.shape[1] for p in parts)
    ids = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1) for p in parts])
    first = next(iter(stats.values()))
    return ids, {**{k: first[k] for k in ("method", "tokenizer", "top_k", "k1", "b")},
                 "search_seconds": sum(st["search_seconds"] for st in stats.values()),
                 "queries_without_lexical_match": sum(st["queries_without_lexical_match"] for st in stats.values()),
                 "sources": stats}


def choose_by_query_range(cands: Candidates | None, n_queries: int, groups: np.ndarray, settings: FilterSettings,
                          score: Any, first_query: int = 0, first_row: int = 0) -> Choice | None:
    """The filter's choice for every query, each process taking one contiguous range of queries (collective):
    the main process scatters the ranges of its candidates and joins the choices; None on the others. Random
    draws are keyed by global row, so the result equals one process's. ``first_query`` / ``first_row``: the
    global index of the first query and row of ``cands`` (one source's part of a several-source mine)."""
    if dist.world_size() <= 1:
        return choose(cands, groups, settings, score, first_query=first_query, first_row=first_row)
    ranges = [dist.slice_of(n_queries, r, dist.world_size()) for r in range(dist.world_size())]
    parts = None
    if cands is not None:
        rows_before = np.concatenate([[0], np.cumsum([len(p) for p in cands.positive_ids])])
        parts = [(cands.take(r), first_row + int(rows_before[r.start])) for r in ranges]
    part, row0 = dist.scatter_from_main(parts)
    mine = choose(part, groups, settings, score, first_query=first_query + ranges[dist.rank()].start,
                  first_row=row0)
    every = dist.gather_to_main(mine)
    return join_choices(every) if every is not None else None


def rescore_pairs(ids: np.ndarray, positive_ids: list[np.ndarray], queries: list[str], corpus: list[str],
                  cfg: MineConfig, random: tuple[np.ndarray, np.ndarray],
                  ) -> tuple[np.ndarray, list[np.ndarray], str, np.ndarray] | None:
    """CrossEncoder scores of every (query, candidate) and (query, positive) pair, and of the ``random`` (query,
    passage) pairs of the calibration (sorted by query), each process taking one contiguous range of queries
    (collective); on the main process (candidate scores -inf padded, positive scores per query, their kind:
    logits, or their sigmoid, see :func:`cross_encoder_score_kind`, and the random pairs' scores), None on the
    others."""
    ce = load_cross_encoder(cfg.rescore.model, device=cfg.teacher.device, max_length=cfg.rescore.max_length)
    mine = dist.slice_of(len(queries), dist.rank(), dist.world_size())
    pairs: list[tuple[str, str]] = []
    for q in mine:
        pairs.extend((queries[q], corpus[d]) for d in ids[q] if d >= 0)
        pairs.extend((queries[q], corpus[d]) for d in positive_ids[q])
    in_range = (random[0] >= mine.start) & (random[0] < mine.stop)
    pairs.extend((queries[q], corpus[d]) for q, d in zip(random[0][in_range].tolist(), random[1][in_range].tolist(),
                                                         strict=True))
    scores = score_pairs(ce, pairs, cfg.rescore.batch_size, "rescore")
    cand = np.full((len(mine), ids.shape[1]), -np.inf, dtype=np.float32)
    pos_scores: list[np.ndarray] = []
    at = 0
    for row, q in enumerate(mine):
        valid = np.flatnonzero(ids[q] >= 0)
        cand[row, valid] = scores[at:at + len(valid)]
        at += len(valid)
        pos_scores.append(scores[at:at + len(positive_ids[q])].copy())
        at += len(positive_ids[q])
    parts = dist.gather_to_main((cand, pos_scores, scores[at:].copy()))
    if parts is None:
        return None
    return (np.concatenate([c for c, _, _ in parts]), [p for _, ps, _ in parts for p in ps],
            cross_encoder_score_kind(ce), np.concatenate([r for _, _, r in parts]))


def apply_rescore(cands: Candidates, new_cand: np.ndarray, new_pos: list[np.ndarray]) -> Candidates:
    """Candidates re-ranked by their CrossEncoder scores, best first; the teacher's scores kept beside them."""
    ids = cands.candidate_ids
    order = np.argsort(-new_cand, axis=1, kind="stable")
    sources = cands.candidate_sources
    return Candidates(cands.query_ids, cands.queries, cands.positive_ids, new_pos,
                      np.take_along_axis(ids, order, 1), np.take_along_axis(new_cand, order, 1), rescored=True,
                      teacher_positive_scores=cands.positive_scores,
                      teacher_candidate_scores=np.take_along_axis(cands.candidate_scores, order, 1),
                      candidate_sources=None if sources is None else np.take_along_axis(sources, order, 1))
