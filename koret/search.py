"""Top-k inner-product search of query embeddings over a (sharded) corpus, bounded in memory.

Backends (``search.backend``):

- ``faiss``: exact ``Flat`` search block by block with ``faiss.knn`` (no copy of the corpus into an index), or
  any ``index_factory`` string (``IVF4096,Flat``, ``HNSW32``, ``IVF1024,PQ32`` ...) trained on a sample of the
  corpus. Where FAISS was built with GPU support a single process spreads the index over all GPUs
  (``shard=True``); in a multi-process run each process puts its slice on its own GPU (:func:`process_gpu`).
- ``torch``: chunked matmul + ``topk``, on CUDA when torch sees a GPU (in a multi-process run, the process's own
  GPU). This is the GPU path where FAISS has no GPU support (faiss-cpu, or no faiss at all). ``search.precision``
  picks the matmul precision (``auto``: float16 on CUDA, float32 on CPU).
- ``auto``: FAISS on its GPUs; else torch on CUDA; else FAISS on CPU; else torch on CPU.

Queries are searched in chunks of ``query_chunk_size`` and the corpus is visited shard by shard, each chunk
keeping a running top-k, so the full query x corpus score matrix never exists: memory is the corpus (often
memory-mapped) plus ``chunk x shard`` scores.

Every score returned is exact float32 (:func:`exact_scores`: float64 products rounded once), whatever
precision chose the candidates, and rows are ordered by (score descending, passage index ascending). For a
Flat index the top-k is exact too, ties included: see :func:`search`. A backend that cannot return k results (FAISS on GPU caps k at
2048) says so and falls back instead of failing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from koret import dist
from koret.errors import KoretError
from koret.report import progress, warn

FAISS_GPU_MAX_K = 2048
QUERY_GROUP = 262_144  # torch search over a streamed corpus: queries whose running top-k is kept on the device


@dataclass
class SearchResult:
    scores: np.ndarray  # (n_queries, k) float32, descending per row; -inf where fewer than k hits
    ids: np.ndarray  # (n_queries, k) int64 corpus indices; -1 where fewer than k hits
    backend: str
    seconds: float
    precision: str = "float32"  # precision the candidates were selected in (scores are always exact fp32)
    rechecked: int = 0  # query rows searched again with more candidates (near-ties at the k-th place)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpus() -> int:
    faiss = _faiss()
    try:
        return int(faiss.get_num_gpus()) if faiss is not None else 0
    except Exception:
        return 0


def process_gpu(n_gpus: int) -> int | None:
    """The one GPU this process searches on in a multi-process run: its ``LOCAL_RANK`` modulo the ``n_gpus`` it
    sees; None in a single-process run, which may use every GPU. A process of a sharded search holds one slice of
    the corpus: spread over all GPUs, N processes would put N contexts and N copies on every GPU."""
    if dist.world_size() <= 1 or n_gpus <= 0:
        return None
    return dist.local_rank() % n_gpus


def torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def choose_backend(requested: str, index: str, k: int) -> str:
    """Resolve ``auto`` and fall back when a backend cannot serve the request; returns e.g. ``faiss-gpu``."""
    flat = index.strip().lower() == "flat"
    faiss = _faiss()
    if requested == "faiss" and faiss is None:
        raise KoretError("search.backend: faiss is not installed", "pip install faiss-cpu (or use backend: torch)")
    if requested == "torch" and not flat:
        raise KoretError(f"search.index: {index!r} needs the faiss backend; torch searches exactly (Flat) only")
    if requested in ("auto", "faiss") and faiss is not None:
        if faiss_gpus() > 0:
            if k <= FAISS_GPU_MAX_K:
                return "faiss-gpu"
            fallback = "torch-cuda" if flat and torch_cuda() else "faiss-cpu"
            warn(f"FAISS on GPU returns at most {FAISS_GPU_MAX_K} results per query, asked for {k}; "
                 f"searching with {fallback} instead")
            return fallback
        if requested == "auto" and flat and torch_cuda():
            return "torch-cuda"
        return "faiss-cpu"
    if not flat:
        raise KoretError(f"search.index: {index!r} needs faiss", "pip install faiss-cpu, or use index: Flat")
    return "torch-cuda" if torch_cuda() else "torch-cpu"


def merge_topk(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row top lists into the top ``k`` of their union, sorted by descending score.

    Ties keep the lower corpus index first, so results do not depend on how the corpus was split into shards.
    """
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    if scores.shape[1] > k:  # keep the k best (ties at the cut resolved by the full sort below)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        cut = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        if not (np.sum(scores >= cut, axis=1) > k).any():
            scores, ids = np.take_along_axis(scores, part, axis=1), np.take_along_axis(ids, part, axis=1)
    return _sorted(scores, ids, k)


def _sorted(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (descending score, ascending id), first ``k`` columns; padding (-1) sorts last."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _groups(blocks: list[np.ndarray], max_bytes: int = 512 * 2**20) -> list[list[np.ndarray]]:
    """Consecutive shards grouped up to ``max_bytes``: each group is searched as one array, read once."""
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for block in blocks:
        nbytes = block.shape[0] * block.shape[1] * 4
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(block)
        size += nbytes
    return groups


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


PRECISIONS = ("auto", "float32", "float16", "bfloat16")
# Bound on |selection score - exact score| relative to |q| x max|x|, per selection precision: fp16 / bf16 round the
# inputs to 11 / 8 significant bits (at most 2 x 2^-11 / 2 x 2^-8 on the product) and the output once more (2^-11 /
# 2^-8), with a margin; accumulation is float32 (reduced-precision reductions are switched off during the search:
# fp32_accumulation), whose bound for a d-term dot product every precision adds (see _tolerance). A passage whose
# selection score is below the k-th exact score by more than this cannot be in the top k.
_TOLERANCE = {"float32": 0.0, "float16": 2.5e-3, "bfloat16": 1.5e-2}


def resolve_precision(precision: str, backend: str) -> str:
    """``auto`` selects candidates in float16 with torch on CUDA and in float32 everywhere else."""
    if precision not in PRECISIONS:
        raise KoretError(f"search.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "float16" if backend == "torch-cuda" else "float32"
    if precision != "float32" and not backend.startswith("torch"):
        raise KoretError(f"search.precision: {precision} selection needs the torch backend (got {backend})",
                         "set search.backend: torch, or search.precision: float32")
    return precision


def max_row_norm(blocks: list[np.ndarray]) -> float:
    """The largest row norm of the corpus blocks, read 65,536 rows at a time: the scale of the selection error
    bound. One read of the whole slice, so :func:`search` computes it once, not once per selection pass."""
    return float(np.sqrt(max(np.max(np.einsum("ij,ij->i", *(np.asarray(b[a:a + 65_536], np.float32),) * 2))
                             for b in blocks for a in range(0, len(b), 65_536))))


def _tolerance(precision: str, queries: np.ndarray, max_norm: float) -> np.ndarray:
    """Per query, the largest |selection score - exact score| over the corpus whose largest row norm is
    ``max_norm`` (see _TOLERANCE)."""
    dim = queries.shape[1]
    q_norm = np.sqrt(np.einsum("ij,ij->i", queries, queries)).astype(np.float64)
    rel = _TOLERANCE[precision] + 4 * (dim + 2) * 2.0**-24
    return rel * q_norm * max_norm + 1e-30


# float64 passage vectors exact_scores gathers in one step: sized to stay in cache (on 2 cores, 2-4 MiB was the
# fastest; 64 rows of 100 x 1024, 52 MiB, about 1.5x slower, 64 MiB of pairs 2x slower)
EXACT_CHUNK_BYTES = 4 * 2**20


def exact_scores(queries: np.ndarray, corpus: Any, ids: np.ndarray, rows: np.ndarray | None = None,
                 chunk: int | None = None) -> np.ndarray:
    """The one score koret stores and ranks by: float32 inner products of ``queries[r]`` with ``corpus[ids[r, j]]``.

    Products and sums are taken in float64 and rounded once to float32, so the value does not depend on the
    backend, the shard layout, the batch a pair was computed in or the order of summation: identical embeddings
    get identical scores. ``corpus`` is an :class:`~koret.encode.Embeddings` (or anything with ``take``); ids < 0
    (padding) score -inf. ``rows[r]`` is the query of row ``r`` of ``ids`` (default: ``r``); ``ids`` may be 1-D
    (one passage per row).

    A 1-D list of pairs (the positives', the lexical candidates': tens of millions) is visited in passage order,
    ``chunk`` pairs at a time, so a step gathers neighbouring rows of one shard, not random rows of every shard
    (a step used to be 64 pairs in list order). A 2-D ``ids`` is visited ``chunk`` rows at a time. By default a
    step gathers ``EXACT_CHUNK_BYTES`` of float64 vectors (512 of 1024 dimensions). A pair's score is the same
    float64 matmul of its own rows whatever the step and the order, so neither changes a bit.
    """
    dim = queries.shape[1]
    if ids.ndim == 1:
        rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)
        step = chunk or max(1, EXACT_CHUNK_BYTES // (8 * max(1, dim)))
        out = np.full(len(ids), -np.inf, dtype=np.float32)
        order = np.argsort(ids)
        order = order[np.count_nonzero(ids < 0):]  # padding sorts first and stays -inf
        for start in range(0, len(order), step):
            sel = order[start:start + step]
            vecs = corpus.take(ids[sel]).astype(np.float64).reshape(len(sel), 1, dim)
            q = np.asarray(queries[rows[sel]], dtype=np.float64).reshape(len(sel), dim, 1)
            out[sel] = np.matmul(vecs, q)[:, 0, 0].astype(np.float32)
        return out
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    step = chunk or max(1, EXACT_CHUNK_BYTES // (8 * max(1, ids.shape[1]) * max(1, dim)))
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(ids), step):
        block = ids[start:start + step]
        valid = block >= 0
        if not valid.any():
            continue
        vecs = corpus.take(np.where(valid, block, 0).reshape(-1)).astype(np.float64)
        vecs = vecs.reshape(block.shape[0], block.shape[1], -1)
        q = np.asarray(queries[rows[start:start + step]], dtype=np.float64)
        s = np.matmul(vecs, q[:, :, None])[:, :, 0].astype(np.float32)
        out[start:start + step] = np.where(valid, s, -np.inf)
    return out


def search(
    queries: np.ndarray,
    corpus: Sequence[np.ndarray],
    k: int,
    *,
    backend: str = "auto",
    index: str = "Flat",
    query_chunk_size: int = 4096,
    nprobe: int | None = None,
    train_sample: int = 262_144,
    description: str = "search",
    seed: int = 0,
    precision: str = "auto",
) -> SearchResult:
    """Top-``k`` corpus rows by inner product for every query, with exact float32 scores.

    ``corpus`` is a list of row blocks (the embedding shards, possibly memory-mapped) whose concatenation is
    the corpus; returned ids index that concatenation. ``k`` larger than the corpus is padded with -1 / -inf.

    Two steps: a backend *selects* candidates (in ``precision``: float16 / bfloat16 are allowed on torch), then
    every candidate is rescored with :func:`exact_scores` and each row is ordered by (score descending, passage
    index ascending). With a ``Flat`` index the selection fetches a few more than ``k`` and checks, per query,
    that no passage left out could reach the k-th exact score given the selection's error bound; rows where one
    could are searched again with twice the candidates in float32. The result is therefore the exact top-k,
    ties included, whatever the backend, precision, ``query_chunk_size``, shard layout or process count.
    Approximate indexes (IVF, HNSW, PQ) choose candidates approximately; their scores are still exact.
    """
    from koret.encode import Embeddings

    started = time.perf_counter()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    blocks = [b for b in corpus if len(b)]
    n_corpus = sum(len(b) for b in blocks)
    if n_corpus == 0:
        raise KoretError("search: the corpus is empty")
    k_eff = min(k, n_corpus)
    chosen = choose_backend(backend, index, k_eff)
    flat = index.strip().lower() == "flat"
    prec = resolve_precision(precision, chosen)
    emb = Embeddings(blocks)

    def select(q: np.ndarray, kk: int, p: str, desc: str) -> tuple[np.ndarray, np.ndarray]:
        if not flat:
            return _faiss_index(q, blocks, kk, index, query_chunk_size, nprobe, train_sample,
                                chosen == "faiss-gpu", desc, seed)
        if chosen.startswith("torch"):
            return _exact_torch(q, blocks, kk, query_chunk_size, chosen, desc, p)
        if chosen == "faiss-gpu":
            return _faiss_index(q, blocks, kk, "Flat", query_chunk_size, None, train_sample, True, desc, seed)
        return _exact_faiss_cpu(q, blocks, kk, query_chunk_size, desc)

    scores, ids = _empty(len(queries), k_eff)
    rechecked = 0
    if not flat:
        _, found = select(queries, k_eff, prec, description)
        scores, ids = _sorted(exact_scores(queries, emb, found), found, k_eff)
    else:
        pending = np.arange(len(queries))
        k_fetch = min(n_corpus, k_eff + (8 if prec == "float32" else max(32, k_eff)))
        p, desc = prec, description
        max_norm: float | None = None  # read once per search (one slice per process), only if a bound is needed
        while len(pending):
            approx, found = select(queries[pending], k_fetch, p, desc)
            s, i = _sorted(exact_scores(queries, emb, found, rows=pending), found, k_fetch)
            if k_fetch >= n_corpus:
                done = np.ones(len(pending), dtype=bool)
            else:  # a passage left out scores (in selection) at most the lowest fetched one
                if max_norm is None:
                    max_norm = max_row_norm(blocks)
                bound = _tolerance(p, queries[pending], max_norm)
                done = approx[:, -1].astype(np.float64) + bound < s[:, k_eff - 1]
            scores[pending[done]], ids[pending[done]] = s[done, :k_eff], i[done, :k_eff]
            pending = pending[~done]
            rechecked += len(pending)
            k_fetch, p, desc = min(n_corpus, 2 * k_fetch), "float32", f"{description} (recheck)"
    if k_eff < k:
        pad_s, pad_i = _empty(len(queries), k - k_eff)
        scores, ids = np.concatenate([scores, pad_s], 1), np.concatenate([ids, pad_i], 1)
    return SearchResult(scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False), chosen,
                        time.perf_counter() - started, precision=prec, rechecked=rechecked)


def _exact_faiss_cpu(queries: np.ndarray, blocks: list[np.ndarray], k: int, chunk: int,
                     description: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with ``faiss.knn``: the corpus is visited once, group by group (at most 512 MB in memory
    besides the shards), every query chunk against each group, keeping a running top-k per query."""
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    n = len(queries)
    out_s, out_i = _empty(n, k)
    groups = _groups(blocks)
    with progress() as bar:
        task = bar.add_task(description, total=n * len(groups), unit="queries")
        offset = 0
        for g, group in enumerate(groups):
            xb = np.ascontiguousarray(group[0] if len(group) == 1 else np.concatenate(group), dtype=np.float32)
            kb = min(k, len(xb))
            for start in range(0, n, chunk):
                d, i = faiss.knn(queries[start:start + chunk], xb, kb, metric=metric)
                i = np.where(i >= 0, i + offset, -1)
                if kb < k:
                    pad_s, pad_i = _empty(len(d), k - kb)
                    d, i = np.concatenate([d, pad_s], 1), np.concatenate([i, pad_i], 1)
                rows = slice(start, start + len(d))
                if g == 0:
                    out_s[rows], out_i[rows] = _sorted(d, i, k)
                else:
                    out_s[rows], out_i[rows] = merge_topk(out_s[rows], out_i[rows], d, i, k)
                bar.update(task, advance=len(d))
            offset += len(xb)
    return out_s, out_i


def _exact_torch(queries: np.ndarray, blocks: list[np.ndarray], k: int, chunk: int, chosen: str,
                 description: str, precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Candidate selection by chunked matmul + topk in ``precision`` (scores are rescored exactly afterwards)."""
    import torch

    device = torch.device("cpu")
    if chosen == "torch-cuda":
        gpu = process_gpu(torch.cuda.device_count())
        device = torch.device("cuda") if gpu is None else torch.device("cuda", gpu)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[precision]
    # Corpus blocks stay resident on the GPU when they fit, else they are streamed per query chunk.
    resident: list[torch.Tensor] | None = None
    if device.type == "cuda":
        need = sum(b.shape[0] * b.shape[1] for b in blocks) * torch.tensor([], dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(device)
        if need < 0.7 * free:
            resident = [_upload(b, device, dtype) for b in blocks]
    n = len(queries)
    out_s = np.empty((n, k), dtype=np.float32)
    out_i = np.empty((n, k), dtype=np.int64)
    with progress() as bar, torch.inference_mode(), fp32_accumulation():
        task = bar.add_task(description, total=n * len(blocks), unit="queries")
        # a streamed corpus is uploaded once per group of up to QUERY_GROUP queries, not once per query chunk
        group = n if resident is not None else max(chunk, QUERY_GROUP)
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            best_s = torch.full((g1 - g0, k), -float("inf"), device=device)
            best_i = torch.full((g1 - g0, k), -1, dtype=torch.int64, device=device)
            offset = 0
            for b, block in enumerate(blocks):
                x = resident[b] if resident is not None else _upload(block, device, dtype)
                kk = min(k, x.shape[0])
                for start in range(g0, g1, chunk):
                    rows = slice(start - g0, min(g1, start + chunk) - g0)
                    q = torch.from_numpy(queries[start:min(g1, start + chunk)]).to(device, dtype)
                    s, i = torch.topk((q @ x.T).float(), kk, dim=1)
                    cat_s = torch.cat([best_s[rows], s], 1)
                    cat_i = torch.cat([best_i[rows], i + offset], 1)
                    top_s, pos = torch.topk(cat_s, k, dim=1)
                    best_s[rows], best_i[rows] = top_s, torch.gather(cat_i, 1, pos)
                    bar.update(task, advance=len(q))
                offset += x.shape[0]
            out_s[g0:g1] = best_s.cpu().numpy()
            out_i[g0:g1] = best_i.cpu().numpy()
    return out_s, out_i


@contextlib.contextmanager
def fp32_accumulation() -> Iterator[None]:
    """Inside, CUDA float16 and bfloat16 matmuls accumulate in float32: torch's reduced-precision reductions for
    both are switched off (on by default; restored on exit), so the selection error stays within _TOLERANCE."""
    import torch

    matmul = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    before = {name: getattr(matmul, name) for name in names}
    try:
        for name in names:
            setattr(matmul, name, False)
        yield
    finally:
        for name, value in before.items():
            setattr(matmul, name, value)


def _upload(block: np.ndarray, device: Any, dtype: Any) -> Any:
    """A corpus block as a tensor on ``device`` in ``dtype``; float16 storage travels as float16 (half the copy)."""
    import torch

    keep = np.float16 if block.dtype == np.float16 else np.float32
    return torch.from_numpy(np.ascontiguousarray(block, dtype=keep)).to(device, dtype)


def _faiss_index(queries: np.ndarray, blocks: list[np.ndarray], k: int, spec: str, chunk: int,
                 nprobe: int | None, train_sample: int, gpu: bool, description: str,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    dim = blocks[0].shape[1]
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise KoretError(f"search.index: {spec!r} is not a valid FAISS index_factory string",
                         "e.g. Flat, IVF4096,Flat, HNSW32, IVF1024,PQ32") from exc
    n_corpus = sum(len(b) for b in blocks)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n_corpus, size=min(train_sample, n_corpus), replace=False))
        from koret.encode import Embeddings

        sample = Embeddings(list(blocks)).take(take)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise KoretError(f"search.index: training {spec!r} on {len(sample):,} vectors failed "
                             f"({str(exc).splitlines()[0]})", "use fewer IVF cells or a Flat index") from exc
    resources = None  # the GPU resources of a single-GPU index, alive as long as the index
    if gpu:
        device = process_gpu(faiss_gpus())
        if device is None:  # one process: the index sharded over every GPU
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            index = faiss.index_cpu_to_all_gpus(index, co=co)
        else:  # one process per GPU: this process's slice on its own GPU
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, device, index)
    for block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    if nprobe is not None:
        try:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except RuntimeError:
            warn(f"search.nprobe is ignored: index {spec!r} has no nprobe")
    n = len(queries)
    out_s = np.empty((n, k), dtype=np.float32)
    out_i = np.empty((n, k), dtype=np.int64)
    with progress() as bar:
        task = bar.add_task(description, total=n, unit="queries")
        for start in range(0, n, chunk):
            d, i = index.search(queries[start:start + chunk], k)
            out_s[start:start + len(d)] = np.where(i >= 0, d, -np.inf)
            out_i[start:start + len(d)] = i
            bar.update(task, advance=len(d))
    del index, resources  # the index before the resources it runs on
    return out_s, out_i
