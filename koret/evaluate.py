"""``koret eval``: retrieval quality of one or more models on the same Korean IR set, side by side.

Reads any IR layout of :mod:`koret.data` (pairs, SQuAD, BEIR with graded qrels, AutoRAG), encodes the corpus
through the same shard cache as ``koret mine`` (so evaluating several checkpoints re-encodes nothing for an
unchanged model), searches exactly through :mod:`koret.search` and scores with :mod:`koret.metrics`, whose
definitions are trec_eval's. The first model is the baseline; the table shows every other model's delta.
Each reranker (``rerankers``, ``--reranker``) reorders the top ``rerank_top_k`` of one model's ranking
(``rerank_model``, default the first) with a CrossEncoder; the rest of that ranking follows in the retriever's
order, so a reranked row's recall@k for k past ``rerank_top_k`` is the retriever's, not a cut list's. A reranked
row is one more row of the table, and its deltas (and their significance) are against the retriever it reranks,
which ``compared_with`` names; retrieval runs once however many rerankers.

A suite of test sets (``sets``, or ``--data`` given more than once) is a loop over the sets, each evaluated as
above (rerankers included), then the macro average over the sets: each metric's mean over the sets, every set
counting alike; the average's deltas have intervals and p-values that resample queries within each set
(:func:`koret.significance.macro_paired_comparison`). Every set is read and checked before any model loads.

Outputs in ``output.dir``: ``metrics.json`` (``{"models": [{"name", "metrics": {"ndcg@10": ...}}, ...]}``
plus config, data fingerprint, seconds and passages/s), ``metrics.csv`` (a row per set, model and metric: value,
delta against the row's reference, interval, p-value), ``per_query.jsonl`` (rank of the first relevant passage
and the top 10 per model), and optionally a Markdown table (``output.markdown``). A suite's ``metrics.json``
keeps those top-level keys and fills them with the macro average (``data``: the sets' totals), so a reader of a
single set's record reads the average; ``sets`` holds each set's record as a single-set run writes it
(``{name: {"models", "baseline", "k", "data", "seconds"}}``) and ``average`` says how the average was formed.
Its ``metrics.csv`` has the rows of every set, then the average's (set ``average``), ``per_query.jsonl`` rows
name their ``set``, and the Markdown file has a table per set, then the average's.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from koret.config import EvalConfig, EvalDataConfig, EvalModelConfig, SignificanceConfig, config_dict
from koret.data import RetrievalData, load_section
from koret.encode import Embeddings, EncodeSettings, encode_texts, load_sentence_transformer, resolve_dtype
from koret.errors import KoretError
from koret.io import write_json, write_text
from koret.metrics import first_relevant_rank, mean_metrics, query_metrics
from koret.prompts import resolve_prompts
from koret.report import console, info, is_quiet, warn
from koret.search import search

TABLE_METRICS = ("ndcg@10", "mrr@10", "map@10", "recall@10", "precision@10", "accuracy@10", "recall@100")


def _label(m: EvalModelConfig, taken: set[str]) -> str:
    base = m.label or Path(m.name.rstrip("/")).name or m.name
    if base in ("final", "model"):
        base = "/".join(Path(m.name.rstrip("/")).parts[-2:])
    label, n = base, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    taken.add(label)
    return label


def model_labels(models: list[EvalModelConfig], taken: set[str] | None = None) -> list[str]:
    """Each model's name in the table, and what ``rerank_model`` names: its label, else its folder or Hub id
    (``parent/final`` for a ``final`` or ``model`` folder); a repeated name gets ``#2``, ``#3``."""
    taken = set() if taken is None else taken
    return [_label(m, taken) for m in models]


AVERAGE = "average"  # the macro average's name in metrics.csv (no set may take it)


@dataclass
class EvalSet:
    """A test set, read and checked: its judged queries (the first ``max_queries``) and its cut-offs."""

    name: str
    section: EvalDataConfig
    data: RetrievalData
    qids: list[int]
    no_relevant: int
    ks: list[int]


def set_name(d: EvalDataConfig) -> str:
    """A set's name: its ``name``, else its folder or file stem (``beir/scifact`` -> ``scifact``,
    ``ko/eval.jsonl`` -> ``eval``, ``squad.json#0:10`` -> ``squad``, a Hub id ``org/set`` -> ``set``)."""
    if d.name:
        return d.name
    p = Path((d.path or "").split("#")[0].rstrip("/"))
    return (p.name if p.is_dir() else p.stem) or p.name or str(d.path)


def eval_sets(cfg: EvalConfig) -> list[tuple[str, EvalDataConfig]]:
    """The sets to evaluate, named: ``sets``, else ``data``; every one with a path and a name of its own."""
    if not cfg.sets:
        if not cfg.data.path:
            raise KoretError("data.path: required key is missing", "give --data PATH")
        return [(set_name(cfg.data), cfg.data)]
    named: list[tuple[str, EvalDataConfig]] = []
    for i, d in enumerate(cfg.sets):
        if not d.path:
            raise KoretError(f"sets[{i}].path: required key is missing", "give every set a path")
        name = set_name(d)
        if name == AVERAGE and len(cfg.sets) > 1:
            raise KoretError(f"sets[{i}]: the name {AVERAGE!r} is the macro average's", "give the set another name")
        if name in (n for n, _ in named):
            raise KoretError(f"sets[{i}]: two sets are named {name!r}",
                             "name them: --data NAME=PATH, or name: in each entry of sets")
        named.append((name, d))
    return named


def load_set(name: str, d: EvalDataConfig, k: list[int], where: str = "") -> EvalSet:
    """Read a set and check it (judged queries, a corpus); errors name the set (``where``) in a suite."""
    try:
        data = load_section(d, "path", dedupe=False)
        qids, no_relevant = judged_queries(data)
    except KoretError as exc:
        if not where:
            raise
        raise KoretError(f"{where}{exc.message}", exc.hint) from exc
    if d.max_queries:
        qids = qids[: d.max_queries]
    ks = list(k)
    if max(ks) > len(data.corpus):
        clamped = sorted({min(x, len(data.corpus)) for x in ks})
        warn(f"{where}k {max(ks)} is larger than the corpus ({len(data.corpus)} passages); clamped to {clamped}")
        ks = clamped
    info(f"{data.source} ({data.format}): {len(qids):,} queries, {len(data.corpus):,} passages", lead="data")
    return EvalSet(name, d, data, qids, no_relevant, ks)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run ``koret eval``; returns what ``metrics.json`` holds."""
    started = time.perf_counter()
    if not cfg.models:
        raise KoretError("models: no model to evaluate", "give --model PATH (repeatable) or a models: list")
    if cfg.mteb:
        check_mteb_reachable()
    named = eval_sets(cfg)
    suite = len(named) > 1
    sets = [load_set(name, d, cfg.k, f"set {name}: " if suite else "") for name, d in named]
    if suite:
        shared = set.intersection(*(set(s.ks) for s in sets))
        dropped = sorted(set().union(*(set(s.ks) for s in sets)) - shared)
        if not shared:
            raise KoretError(f"sets: no cut-off k is shared by every set after clamping to each corpus "
                             f"({'; '.join(f'{s.name}: {s.ks}' for s in sets)}), so there is no average",
                             "give k values every set's corpus allows, or evaluate the sets apart")
        if dropped:
            warn(f"sets: the average leaves out the metrics at k = {dropped}: not every set's corpus is that large")

    blocks: dict[str, dict[str, Any]] = {}
    scored: dict[str, dict[str, list[dict[str, float]]]] = {}
    per_query: list[dict[str, Any]] = []
    for s in sets:
        t0 = time.perf_counter()
        block, rows, scored[s.name] = evaluate_set(cfg, s)
        blocks[s.name] = {**block, "seconds": time.perf_counter() - t0} if suite else block
        per_query += [{"set": s.name, **row} for row in rows] if suite else rows
    out = suite_record(blocks, scored, cfg.significance) if suite else blocks[sets[0].name]
    out = {**out, "config": config_dict(cfg), "seconds": time.perf_counter() - started}
    if cfg.mteb:
        out["mteb"] = run_mteb(cfg)
    out_dir = Path(cfg.output.dir)
    write_json(out_dir / "metrics.json", out)
    write_text(out_dir / "per_query.jsonl",
               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_query))
    tables = [(name, b["models"]) for name, b in blocks.items()] + ([(AVERAGE, out["models"])] if suite else [])
    write_text(out_dir / "metrics.csv", csv_table(tables))
    if cfg.output.markdown:
        write_text(cfg.output.markdown, suite_markdown(out) if suite else markdown_table(out["models"]))
    for name, b in blocks.items():
        show_table(b["models"], f"{name} ({b['data']['source']})" if suite else b["data"]["source"])
    if suite:
        show_table(out["models"], f"{AVERAGE} of {len(blocks)} sets")
    return out


def evaluate_set(cfg: EvalConfig, s: EvalSet) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                         dict[str, list[dict[str, float]]]]:
    """Every model (and reranker) on one set: its record (``models``, ``baseline``, ``k``, ``data``), its
    per-query rows and each row's per-query metrics (label -> one dict per query, in query order)."""
    data, qids, ks = s.data, s.qids, s.ks
    if s.section is not cfg.data:  # an entry of sets: its own data options (normalize) for the encoder
        cfg = cfg.model_copy(update={"data": s.section})
    taken: set[str] = set()
    results: list[dict[str, Any]] = []
    per_query: list[dict[str, Any]] = [
        {"query_id": data.query_ids[q], "query": data.queries[q],
         "relevant": {data.doc_ids[doc]: g for doc, g in data.qrels[q].items() if g > 0}, "models": {}}
        for q in qids
    ]
    labels = model_labels(cfg.models, taken)
    target = cfg.rerank_model or labels[0]
    if cfg.rerankers and target not in labels:
        raise KoretError(f"rerank_model: {target!r} is not one of the models' labels ({', '.join(labels)})")
    rankings: dict[str, np.ndarray] = {}
    scored: dict[str, list[dict[str, float]]] = {}  # label -> per-query metrics, in qids order
    doc_rank = doc_rank_desc(data.doc_ids)  # trec_eval's tie order, once for every model and reranker
    for m, label in zip(cfg.models, labels, strict=True):
        depth = max(max(ks), cfg.rerank_top_k) if cfg.rerankers and label == target else max(ks)
        res = evaluate_model(m, data, qids, ks, cfg, depth=depth, doc_rank=doc_rank)
        results.append({"name": label, "model": m.name, **({"compared_with": labels[0]} if results else {}),
                        **res["summary"]})
        _add_per_query(per_query, data, qids, label, res["ranked"], res["scores"])
        rankings[label] = res["ranked"]
        scored[label] = res["per_query"]
    for r in cfg.rerankers:
        label = f"{target} + {_label(r, taken)}"
        res = rerank(r, data, qids, rankings[target], cfg.rerank_top_k, ks, doc_rank)
        results.append({"name": label, "model": r.name, "reranks": target, "rerank_top_k": cfg.rerank_top_k,
                        "compared_with": target, **res["summary"]})
        _add_per_query(per_query, data, qids, label, res["ranked"], res["scores"])
        scored[label] = res["per_query"]
    add_significance(results, {label: [rows] for label, rows in scored.items()}, cfg.significance)
    block = {
        "models": results,
        "baseline": results[0]["name"],
        "k": ks,
        "data": {"source": data.source, "format": data.format, "fingerprint": data.fingerprint(),
                 "queries": len(qids), "queries_without_relevant": s.no_relevant, "passages": len(data.corpus),
                 "skipped": data.counts},
    }
    return block, per_query, scored


def suite_record(blocks: dict[str, dict[str, Any]], scored: dict[str, dict[str, list[dict[str, float]]]],
                 cfg: SignificanceConfig) -> dict[str, Any]:
    """A suite's ``metrics.json`` (without config and seconds): the macro average in a single set's top-level
    keys, ``average`` (how it was formed) and ``sets`` (each set's record).

    Each row's average metric is its mean over the sets (the metrics every set has: cut-offs clamped to a small
    corpus drop out); its deltas' significance comes from every set's per-query scores, queries resampled within
    each set (:func:`add_significance` with one list per set)."""
    names = list(blocks)
    first = blocks[names[0]]
    rows_by_set = {n: {r["name"]: r for r in b["models"]} for n, b in blocks.items()}
    keys = [k for k in first["models"][0]["metrics"] if all(k in b["models"][0]["metrics"] for b in blocks.values())]
    rows = [{**{f: r[f] for f in ("name", "model", "compared_with", "reranks", "rerank_top_k") if f in r},
             "metrics": {k: float(np.mean([rows_by_set[n][r["name"]]["metrics"][k] for n in names])) for k in keys}}
            for r in first["models"]]
    add_significance(rows, {r["name"]: [scored[n][r["name"]] for n in names] for r in rows}, cfg)
    data = [b["data"] for b in blocks.values()]
    return {
        "models": rows,
        "baseline": rows[0]["name"],
        "k": sorted(set.intersection(*(set(b["k"]) for b in blocks.values()))),
        "data": {"source": ", ".join(names), "format": "suite", "sets": names,
                 **{f: sum(d[f] for d in data) for f in ("queries", "queries_without_relevant", "passages")}},
        "average": {"sets": names, "queries": {n: d["queries"] for n, d in zip(names, data, strict=True)},
                    "k_left_out": sorted(set().union(*(set(b["k"]) for b in blocks.values()))
                                         - set.intersection(*(set(b["k"]) for b in blocks.values()))),
                    "method": "macro average: each metric's mean over the sets, every set counting alike; the "
                              "deltas' intervals and p-values resample (and sign-flip) queries within each set"},
        "sets": blocks,
    }


def _add_per_query(per_query: list[dict[str, Any]], data: RetrievalData, qids: list[int], label: str,
                   ranked: np.ndarray, scores: np.ndarray) -> None:
    for row, q, ids_row, scores_row in zip(per_query, qids, ranked, scores, strict=True):
        q_rel = {data.doc_ids[doc]: g for doc, g in data.qrels[q].items()}
        ids = [data.doc_ids[i] for i in ids_row if i >= 0]
        # a reranked list's passages past rerank_top_k have no reranker score (NaN): null
        row["models"][label] = {"first_relevant_rank": first_relevant_rank(ids, q_rel),
                                "top10": [[i, None if np.isnan(s) else float(s)]
                                          for i, s in zip(ids[:10], scores_row[:10], strict=True)]}


def rerank(r: Any, data: RetrievalData, qids: list[int], ranked: np.ndarray, top_k: int, ks: list[int],
           doc_rank: np.ndarray) -> dict[str, Any]:
    """Reorder the first ``top_k`` of each query's retrieved passages (``ranked``, best first, -1 padded) by a
    CrossEncoder's scores, ties in trec_eval's order, and score the lists with the same metrics.

    The passages past ``top_k`` follow in the retriever's order (their score: NaN, the reranker did not score
    them): reranking reorders the retriever's list, it does not shorten it, so recall@k for k >= ``top_k`` is
    the retriever's."""
    from koret.encode import load_cross_encoder, score_pairs

    t0 = time.perf_counter()
    ce = load_cross_encoder(r.name, key=f"rerankers[{r.name}]", max_length=r.max_length)
    head, tail = ranked[:, :top_k], ranked[:, top_k:]
    valid = head >= 0
    pairs = [(data.queries[q], data.corpus[d]) for q, row in zip(qids, head, strict=True) for d in row if d >= 0]
    flat = score_pairs(ce, pairs, r.batch_size, "rerank", logits=True)  # no float32 sigmoid ties
    scores = np.full(head.shape, -np.inf, dtype=np.float32)
    scores[valid] = flat
    ids, scores = trec_order(head, scores, doc_rank)
    # padding (-1) only ever ends a row: a short head means the retriever returned nothing after it
    ids = np.concatenate([ids, tail], axis=1)
    scores = np.concatenate([scores, np.full(tail.shape, np.nan, dtype=np.float32)], axis=1)
    per_q = [query_metrics(row[row >= 0].tolist(), data.qrels[q], ks) for q, row in zip(qids, ids, strict=True)]
    seconds = time.perf_counter() - t0
    del ce
    return {"summary": {"metrics": mean_metrics(per_q), "seconds": seconds,
                        "pairs_per_second": len(pairs) / seconds if seconds > 0 else None},
            "ranked": ids, "scores": scores, "per_query": per_q}


def doc_rank_desc(doc_ids: list[str]) -> np.ndarray:
    """Each passage's position in descending document-id order (trec_eval's tie order)."""
    n = len(doc_ids)
    rank = np.empty(n, dtype=np.int64)
    rank[sorted(range(n), key=doc_ids.__getitem__, reverse=True)] = np.arange(n)
    return rank


def trec_order(ids: np.ndarray, scores: np.ndarray, doc_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted as trec_eval sorts a run: score descending, then document id descending; -1 padding last."""
    rank = np.where(ids >= 0, doc_rank[np.maximum(ids, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((rank, -scores), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def judged_queries(data: RetrievalData) -> tuple[list[int], int]:
    """Every judged query (as trec_eval / pytrec_eval evaluate them), and how many have no relevant passage.

    A query whose judgments are all grade 0 stays in the average and scores 0 on every metric, as pytrec_eval
    (and so MTEB) count it; a query with no judgment line at all is not part of the set.
    """
    qids = list(range(len(data.queries)))
    no_relevant = sum(1 for q in qids if not any(g >= 1 for g in data.qrels[q].values()))
    if no_relevant and no_relevant < len(qids):
        warn(f"{no_relevant:,} judged queries have no relevant passage: they count as 0 on every metric, as in "
             "trec_eval / pytrec_eval (MTEB)")
    if no_relevant == len(qids):
        raise KoretError(f"data.path: {data.source}: no query has a relevant passage", "check the qrels")
    if not data.corpus:
        raise KoretError(f"data.path: {data.source}: the corpus is empty")
    return qids, no_relevant


def evaluate_model(m: EvalModelConfig, data: RetrievalData, qids: list[int], ks: list[int],
                   cfg: EvalConfig, depth: int | None = None, doc_rank: np.ndarray | None = None) -> dict[str, Any]:
    """Encode (cached), search and score one model; returns summary, rankings and scores per query."""
    t0 = time.perf_counter()
    model = load_sentence_transformer(m.name, key=f"models[{m.name}]", dtype=m.dtype, max_seq_length=m.max_seq_length)
    q_prompt, p_prompt = resolve_prompts(model.prompts, m, f"models[{m.name}]")
    enc = EncodeSettings(model_name=m.name, batch_size=m.batch_size, max_seq_length=m.max_seq_length,
                         dtype=resolve_dtype(m.dtype, str(model.device)),
                         normalize=cfg.data.normalize, shard_size=cfg.encode.shard_size, cache_dir=cfg.cache_dir,
                         verify=cfg.encode.verify, storage=cfg.encode.dtype)
    corpus_emb, corpus_stats = encode_unique(model, data.corpus, p_prompt, enc, "encode passages")
    queries = [data.queries[q] for q in qids]
    query_emb, query_stats = encode_unique(model, queries, q_prompt, enc, "encode queries")
    if doc_rank is None:
        doc_rank = doc_rank_desc(data.doc_ids)
    ranked, scores, backend = rank_like_trec_eval(query_emb.to_array(), corpus_emb, depth or max(ks), doc_rank, cfg)
    per_q = [query_metrics(row[row >= 0].tolist(), data.qrels[q], ks) for q, row in zip(qids, ranked, strict=True)]
    seconds = time.perf_counter() - t0
    summary = {
        "metrics": mean_metrics(per_q),
        "prompts": {"query": q_prompt, "passage": p_prompt},
        "encode": {"passages": corpus_stats, "queries": query_stats},
        "seconds": seconds,
        "passages_per_second": corpus_stats["texts_per_second"],
        "search_backend": backend,
    }
    del model
    return {"summary": summary, "ranked": ranked, "scores": scores, "per_query": per_q}


def encode_unique(model: Any, texts: list[str], prompt: str, enc: EncodeSettings,
                  description: str) -> tuple[Embeddings, dict[str, Any]]:
    """Encode each distinct text once; entries with equal texts (kept apart by their ids) share one embedding,
    so they score exactly alike."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    if len(index) == len(texts):
        return encode_texts(model, texts, prompt, enc, description)
    emb, stats = encode_texts(model, list(index), prompt, enc, description)
    stats = {**stats, "texts": len(texts), "distinct_texts": len(index)}
    return Embeddings([emb.take(inverse)]), stats


def rank_like_trec_eval(queries: np.ndarray, corpus: Embeddings, k: int, doc_rank: np.ndarray,
                        cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Top ``k`` per query in trec_eval's order: exact score descending, then document id descending.

    trec_eval (and pytrec_eval, MTEB) sort a run by score and break ties by the document id string in reverse
    order; with graded qrels that order changes NDCG. The search breaks ties by passage index instead, so it
    fetches past ``k`` until every tie group that reaches the k-th place is complete, then re-sorts.
    """
    n = len(corpus)
    k = min(k, n)
    fetch = min(n, k + 16)
    while True:
        result = search(queries, corpus.shards, fetch, backend=cfg.search.backend,
                        query_chunk_size=cfg.search.query_chunk_size, precision=cfg.search.precision,
                        description="search")
        open_ties = result.scores[:, -1] == result.scores[:, k - 1]
        if fetch >= n or not open_ties.any():
            break
        fetch = min(n, fetch * 2)
    ids, scores = trec_order(result.ids, result.scores, doc_rank)
    return ids[:, :k], scores[:, :k], result.backend


def reference(r: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The row ``r``'s deltas are against: the one ``compared_with`` names (a reranked row: the retriever it
    reranks), else the first row (the baseline; also for records written before ``compared_with``)."""
    ref = r.get("compared_with")
    return next((x for x in results if x["name"] == ref), results[0])


def add_significance(results: list[dict[str, Any]], scored: dict[str, list[list[dict[str, float]]]],
                     cfg: SignificanceConfig) -> None:
    """Each result after the baseline gets ``significance``: for every table metric, the gain over its reference
    (:func:`reference`: the baseline, or for a reranked row the retriever it reranks), its paired-bootstrap
    confidence interval and the paired randomization test's p-value.

    ``scored[label]`` holds one list of per-query metrics per set: one set, the plain paired comparison; several,
    the comparison of the macro average over the sets (:func:`koret.significance.macro_paired_comparison`, which
    for one set is exactly :func:`koret.significance.paired_comparison`)."""
    if cfg.resamples == 0 or len(results) < 2:
        return
    from koret.significance import macro_paired_comparison

    metrics = [k for k in TABLE_METRICS if k in results[0]["metrics"]]
    arrays = {label: {k: [np.array([q[k] for q in rows]) for rows in sets] for k in metrics}
              for label, sets in scored.items()}
    n_sets = len(next(iter(scored.values())))
    within = "" if n_sets == 1 else f" within each of the {n_sets} sets (macro average)"
    for r in results[1:]:
        base = reference(r, results)["name"]
        compared = {k: macro_paired_comparison(arrays[base][k], arrays[r["name"]][k], resamples=cfg.resamples,
                                               confidence=cfg.confidence, seed=cfg.seed).as_dict()
                    for k in metrics}
        r["significance"] = {"baseline": base, "test": f"paired randomization (sign flip{within}), two-sided",
                             "interval": f"paired bootstrap{within}, percentile, {cfg.confidence:.0%}",
                             "resamples": cfg.resamples, "metrics": compared}


def _delta_text(r: dict[str, Any], k: str, ref: dict[str, Any], sep: str = " ") -> str:
    """``+0.0094 [+0.0025, +0.0164] p=0.007``: ``r``'s gain over the row ``ref`` (interval and p only when
    computed against that same row)."""
    delta = r["metrics"][k] - ref["metrics"][k]
    sig = r.get("significance", {})
    sig = sig.get("metrics", {}).get(k) if sig.get("baseline", ref["name"]) == ref["name"] else None
    if not sig:
        return f"{delta:+.4f}"
    return f"{delta:+.4f}{sep}[{sig['ci_low']:+.4f}, {sig['ci_high']:+.4f}] p={format_p(sig['p_value'])}"


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def show_table(results: list[dict[str, Any]], title: str) -> None:
    """Metrics x models (fits a narrow terminal), each model after the first with its delta (green up, red down)."""
    if is_quiet():
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"koret eval: {escape(title)}", title_justify="left", header_style="bold")  # a path: text
    t.add_column("metric")
    first = results[0]["name"]
    for i, r in enumerate(results):
        ref = reference(r, results)["name"]
        t.add_column(escape(r["name"] + (" (baseline)" if i == 0 else f"\n(vs {ref})" if ref != first else "")),
                     justify="right")
    base = results[0]["metrics"]
    for k in [k for k in TABLE_METRICS if k in base]:
        cells = []
        for i, r in enumerate(results):
            v = r["metrics"][k]
            if i == 0:
                cells.append(f"{v:.4f}")
            else:
                ref = reference(r, results)
                delta = v - ref["metrics"][k]
                color = "green" if delta > 0 else "red" if delta < 0 else "dim"
                sig = r.get("significance", {}).get("metrics", {}).get(k)
                if sig and sig["ci_low"] <= 0 <= sig["ci_high"]:
                    color = "dim"  # the interval holds zero: not a measurable difference
                text = escape(_delta_text(r, k, ref, sep="\n"))
                cells.append(f"{v:.4f} [{color}]{text}[/{color}]")
        t.add_row(k, *cells)
    console().print(t)


def markdown_table(results: list[dict[str, Any]], sets: dict[str, int] | None = None) -> str:
    """Metrics x models; every model after the baseline shows its delta against its reference (the baseline, or
    for a reranked row the retriever it reranks, named in the row), and where computed the delta's confidence
    interval and p-value, with a line saying how they were computed. ``sets`` (name -> queries): the rows are a
    macro average over those sets, and the line says so."""
    metrics = [k for k in TABLE_METRICS if k in results[0]["metrics"]]
    lines = ["| model | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    first = results[0]["name"]
    for i, r in enumerate(results):
        ref = reference(r, results)
        cells = [f"{r['metrics'][k]:.4f}" + ("" if i == 0 else f" ({_delta_text(r, k, ref)})")
                 for k in metrics]
        name = r["name"] + (f" (vs {ref['name']})" if i > 0 and ref["name"] != first else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [f"{r['name']} against {reference(r, results)['name']}, the retrieval it reranks"
              for r in results[1:] if reference(r, results)["name"] != first]
    sig = next((r["significance"] for r in results[1:]
                if r.get("significance", {}).get("baseline") == reference(r, results)["name"]), None)
    if len(results) > 1:
        against = f"Deltas against {first}" + (f" ({'; '.join(others)})" if others else "")
        lines.append("")
        if sig:
            n = next(iter(sig["metrics"].values()))["queries"] if sig["metrics"] else 0
            over = (f"over {len(sets)} sets ({' + '.join(f'{q:,}' for q in sets.values())} queries): "
                    f"[{sig['interval']} interval of the macro-mean gain, queries resampled within each set]"
                    if sets else f"over {n:,} queries: [{sig['interval']} interval of the mean gain]")
            lines.append(f"{against} {over}, p = {sig['test']} ({sig['resamples']:,} resamples).")
        else:
            lines.append(f"{against}.")
    return "\n".join(lines) + "\n"


def suite_markdown(record: dict[str, Any], level: str = "##") -> str:
    """A suite's tables: one per set (:func:`markdown_table`), then the macro average's."""
    parts = []
    for name, block in record["sets"].items():
        d = block["data"]
        parts += [f"{level} {name}", "", f"`{d['source']}`: {d['queries']:,} queries, {d['passages']:,} passages.",
                  "", markdown_table(block["models"])]
    parts += [f"{level} {AVERAGE}", "", f"Macro average over the {len(record['sets'])} sets (each counts alike); "
              "intervals and p-values resample queries within each set.", "",
              markdown_table(record["models"], {n: b["data"]["queries"] for n, b in record["sets"].items()})]
    return "\n".join(parts)


CSV_COLUMNS = ("set", "model", "compared_with", "metric", "value", "delta", "ci_low", "ci_high", "p_value")


def csv_table(tables: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """``metrics.csv``: a row per set, model and metric (``tables``: each set's name and rows, the average last),
    with the delta against the row's reference (:func:`reference`) and, where computed against that same row,
    the interval and p-value; the baseline's delta cells are empty."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for set_label, results in tables:
        for i, r in enumerate(results):
            ref = reference(r, results) if i else None
            sig = r.get("significance", {})
            sig_metrics = sig.get("metrics", {}) if ref and sig.get("baseline") == ref["name"] else {}
            for k, v in r["metrics"].items():
                c = sig_metrics.get(k, {})
                writer.writerow([set_label, r["name"], ref["name"] if ref else "", k, v,
                                 v - ref["metrics"][k] if ref else "", c.get("ci_low", ""), c.get("ci_high", ""),
                                 c.get("p_value", "")])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- MTEB


def check_mteb_reachable(timeout: float = 3.0) -> None:
    """MTEB needs the package and the Hub; fail in seconds with one line instead of hanging offline."""
    try:
        import mteb  # noqa: F401
    except ImportError as exc:
        raise KoretError("--mteb needs the mteb package", "pip install 'koret[mteb]'") from exc
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise KoretError("--mteb needs the Hugging Face Hub, but HF_HUB_OFFLINE is set",
                         "unset HF_HUB_OFFLINE on a machine with internet access")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as exc:
        raise KoretError(f"--mteb needs the Hugging Face Hub, which cannot be reached ({exc})",
                         "run it on a machine with internet access") from exc


def run_mteb(cfg: EvalConfig) -> list[dict[str, Any]]:  # pragma: no cover - needs the Hub
    """MTEB's Korean retrieval tasks for every model, each loaded and prompted exactly as koret's own eval does
    (same loader, dtype, max length and prompt rule), so base and trained model are treated alike."""
    import mteb

    try:
        from mteb.models import SentenceTransformerEncoderWrapper
    except ImportError:
        from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    results = []
    tasks = mteb.get_tasks(tasks=cfg.mteb, languages=["kor"])
    for m in cfg.models:
        model = load_sentence_transformer(m.name, key=f"models[{m.name}]", dtype=m.dtype,
                                          max_seq_length=m.max_seq_length)
        q_prompt, p_prompt = resolve_prompts(model.prompts, m, f"models[{m.name}]")
        prompts = {k: v for k, v in (("query", q_prompt), ("document", p_prompt)) if v}
        wrapped = SentenceTransformerEncoderWrapper(model, model_prompts=prompts or None)
        for task_result in mteb.evaluate(wrapped, tasks=tasks):
            results.append({"model": m.name, "task": task_result.task_name, "ndcg@10": task_result.get_score(),
                            "prompts": prompts})
    return results
