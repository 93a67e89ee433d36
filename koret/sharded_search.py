"""Exact search over a corpus sharded across processes: each process searches its own slice, the main process
merges (``koret mine`` under ``--num-processes`` / torchrun / accelerate launch, one process per GPU, any
number of machines).

Each process holds one contiguous slice of the corpus shards (:func:`koret.dist.slice_of`; memory-mapped, and
only its slice is ever read) and every query embedding. Every process finds its slice's top-k with exact float32
scores (:func:`koret.search.search`, any backend or FAISS index, ids shifted to global passage indices; one call,
so a GPU uploads the slice once); then, a chunk of queries at a time, the chunk is split into one range per
process, every process sends each range's lists to that range's process (an all-to-all), and each merges its range,
keeping the best k by (score descending, global passage index ascending) (:func:`merge_slices`); the main process
gathers the merged ranges. So the merge runs on every process at once, and the main process receives k results a
query instead of k per process. A slice's own top-k holds every member of the global top-k that lies in it, ties
included, so the merged list is the single-process exact search's, candidate for candidate. Scores of given (query,
passage) pairs, such as the positives', are computed by the process owning the passage (:func:`pair_scores`). The
main process never reads another slice's embeddings: its memory is its slice, the queries, its local top-k, one
chunk of exchanged lists and the output.

Every function here is collective: every process calls it, the main process gets the result, the others None.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from koret import dist
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
                  subset: np.ndarray | None = None, **search_kwargs: Any) -> SearchResult | None:
    """The exact global top-``k`` of every query over the corpus whose slice ``local`` (an
    :class:`~koret.encode.Embeddings` with ``start``) this process holds. Collective.

    Every process first searches all the queries against its slice in one call (so a GPU keeps the slice
    resident, uploaded once, and the backend chunks the queries itself), then the lists are merged ``chunk``
    queries at a time: a process holds its slice, its local top-k and one chunk of received lists.

    ``subset`` (sorted global passage indices, the same on every process) searches only those passages (one
    source's pool in a multi-source mine, :mod:`koret.sources`): each process copies the rows of its slice that
    the subset holds and searches them; the ids returned are global, ties ordered by global index as always."""
    started = time.perf_counter()
    rows = None
    if subset is not None:  # this process's part of the subset, as its own block of rows
        subset = np.asarray(subset, dtype=np.int64)
        rows = subset[np.searchsorted(subset, local.start):np.searchsorted(subset, local.start + len(local))]
        n_corpus = len(subset)
        local = _Rows(local.take(rows - local.start) if len(rows) else np.zeros((0, max(local.dim, 1)), np.float32),
                      local.start)
    if dist.world_size() <= 1:
        res = search(queries, local.shards, k, **search_kwargs)
        return _to_global(res, rows) if rows is not None else res
    k = min(k, n_corpus)
    if len(local):
        res = search(queries, local.shards, min(k, len(local)), **search_kwargs)
        local_s = res.scores
        local_i = np.where(res.ids >= 0, rows[np.maximum(res.ids, 0)] if rows is not None else res.ids + local.start,
                           -1)
        info = (res.backend, res.rechecked)
    else:  # more processes than shards: an empty slice
        local_s, local_i = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        info = ("", 0)
    infos = dist.gather_to_main(info)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32) if dist.is_main() else None
    out_ids = np.full((len(queries), k), -1, dtype=np.int64) if dist.is_main() else None
    for a in range(0, len(queries), chunk):
        n = min(chunk, len(queries) - a)
        ranges = [dist.slice_of(n, r, dist.world_size()) for r in range(dist.world_size())]
        received = dist.all_to_all([(local_s[a + r.start:a + r.stop], local_i[a + r.start:a + r.stop])
                                  for r in ranges])
        parts = dist.gather_to_main(merge_slices(received, k))
        if parts is not None:
            for r, (s, i) in zip(ranges, parts, strict=True):
                rows = slice(a + r.start, a + r.stop)
                out_scores[rows, : s.shape[1]], out_ids[rows, : i.shape[1]] = s, i
    if infos is None:
        return None
    backend = next((b for b, _ in infos if b), "")
    return SearchResult(out_scores, out_ids, f"{backend} x {dist.world_size()} slices",
                        time.perf_counter() - started, rechecked=sum(r for _, r in infos))


class _Rows:
    """A block of embedding rows searched as a slice (a subset's rows held by this process)."""

    def __init__(self, array: np.ndarray, start: int) -> None:
        self.shards = [array]
        self.start = start

    def __len__(self) -> int:
        return len(self.shards[0])


def _to_global(res: SearchResult, rows: np.ndarray) -> SearchResult:
    """A search over ``rows`` (a subset's rows) with global ids."""
    return dataclasses.replace(res, ids=np.where(res.ids >= 0, rows[np.maximum(res.ids, 0)], -1))


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
