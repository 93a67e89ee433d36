"""Exact search over a corpus sharded across processes: each process searches its own slice, the main process
merges (``koret mine`` under ``--num-processes`` / torchrun / accelerate launch, one process per GPU, any
number of machines).

Each process holds one contiguous slice of the corpus shards (:func:`koret.encode.slice_of`; memory-mapped,
and only its slice is ever read) and every query embedding. Queries are searched in chunks: every process
finds its slice's top-k with exact float32 scores (:func:`koret.search.search`, any backend or FAISS index,
ids shifted to global passage indices); the chunk's queries are then split into one range per process, every
process sends each range's lists to that range's process (an all-to-all), and each merges its range, keeping
the best k by (score descending, global passage index ascending) (:func:`merge_slices`); the main process
gathers the merged ranges. So the merge runs on every process at once, and the main process receives k
results a query instead of k per process. A slice's own top-k holds every member of the global top-k that lies
in it, ties included, so the merged list is the single-process exact search's, candidate for candidate. Scores of given (query, passage) pairs, such as the positives', are
computed by the process owning the passage (:func:`pair_scores`). The main process never reads another
slice's embeddings: its memory is its slice, the queries, one chunk of gathered results and the output.

Every function here is collective: every process calls it, the main process gets the result, the others None.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from koret import dist
from koret.encode import slice_of
from koret.search import SearchResult, exact_scores, search


def merge_slices(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, the best ``k`` of the slices' (scores, global ids) lists, by (score desc, id asc); -inf /
    -1 padding last. Pure."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    tie_key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.lexsort((tie_key, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def search_slices(queries: np.ndarray, local: Any, n_corpus: int, k: int, *, chunk: int = 65_536,
                  **search_kwargs: Any) -> SearchResult | None:
    """The exact global top-``k`` of every query over the corpus whose slice ``local`` (an
    :class:`~koret.encode.Embeddings` with ``start``) this process holds. Collective."""
    started = time.perf_counter()
    if dist.world_size() <= 1:
        return search(queries, local.shards, k, **search_kwargs)
    k = min(k, n_corpus)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32) if dist.is_main() else None
    out_ids = np.full((len(queries), k), -1, dtype=np.int64) if dist.is_main() else None
    backend, rechecked = "", 0
    for a in range(0, len(queries), chunk):
        q = queries[a:a + chunk]
        if len(local):
            res = search(q, local.shards, min(k, len(local)), **search_kwargs)
            part = (res.scores, np.where(res.ids >= 0, res.ids + local.start, -1), res.backend, res.rechecked)
        else:  # more processes than shards: an empty slice
            part = (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), "", 0)
        ranges = [slice_of(len(q), r, dist.world_size()) for r in range(dist.world_size())]
        received = dist.exchange([(part[0][r.start:r.stop], part[1][r.start:r.stop]) for r in ranges])
        merged = merge_slices(received, k)
        parts = dist.gather_to_main((merged, part[2], part[3]))
        if parts is not None:
            for r, ((s, i), _, _) in zip(ranges, parts, strict=True):
                rows = slice(a + r.start, a + r.stop)
                out_scores[rows, : s.shape[1]], out_ids[rows, : i.shape[1]] = s, i
            backend = next((p[1] for p in parts if p[1]), backend)
            rechecked += sum(p[2] for p in parts)
    if not dist.is_main():
        return None
    return SearchResult(out_scores, out_ids, f"{backend} x {dist.world_size()} slices",
                        time.perf_counter() - started, rechecked=rechecked)


def pair_scores(queries: np.ndarray, local: Any, rows: np.ndarray, passages: np.ndarray) -> np.ndarray | None:
    """Exact float32 teacher scores of the pairs (``queries[rows[j]]``, passage ``passages[j]``), each computed
    by the process whose slice holds the passage; -inf where ``passages[j] < 0``. Collective."""
    rows = np.asarray(rows, dtype=np.int64)
    passages = np.asarray(passages, dtype=np.int64)
    if dist.world_size() <= 1:
        return exact_scores(queries, local, passages, rows=rows)
    mine = np.flatnonzero((passages >= local.start) & (passages < local.start + len(local)))
    values = exact_scores(queries, local, passages[mine] - local.start, rows=rows[mine]) if len(mine) else \
        np.zeros(0, np.float32)
    parts = dist.gather_to_main((mine, values))
    if parts is None:
        return None
    out = np.full(len(passages), -np.inf, dtype=np.float32)
    for idx, vals in parts:
        out[idx] = vals
    return out
