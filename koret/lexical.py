"""Korean lexical candidates for mining: BM25 over morphemes (``search.lexical``).

A dense teacher and a lexical retriever miss different passages: BM25 finds lexical near-misses (the same
entity, number or rare noun in another context) that a dense model may rank low. ``koret mine`` takes the
union of the dense top ``search.top_k`` and the BM25 top ``search.lexical.top_k``; every candidate is then
scored by the teacher, so the positive-aware filters apply to both alike (:func:`union_candidates`).

Tokenizer: Korean is agglutinative (``서울특별시이며`` = 서울 + 특별시 + 이 + 며), so whitespace tokens rarely
match across sentences. Texts are NFC-normalized (decomposed jamo would not be analysed) and split into
morphemes by Kiwi (kiwipiepy; Lee, "Kiwi: Developing a Korean Morphological Analyzer", 2024); content
morphemes are kept: nouns (NNG, NNP, NR), verb and adjective stems (VV, VA), roots (XR), foreign words, hanja
and numbers (SL, SH, SN; Latin lowercased). Particles, endings and punctuation are dropped. Kiwi tags the stems
of irregular verbs and adjectives with a suffix (``돕/VV-I`` in 도와서, ``아름답/VA-I`` in 아름다운; ``-R`` for
regular ones where it disambiguates): a tag is judged by its base, the part before ``-``.

Index: bm25s (Lù, "BM25S: Orders of magnitude faster lexical search via eager sparse scoring", 2024), Lucene's
BM25 variant: ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` and
``score = sum over query terms of idf x tf / (tf + k1 x (1 - b + b x len / avglen))``. It is cached in
``<cache_dir>/lexical/<key>/``, the key covering the corpus texts, the tokenizer (and Kiwi's version) and the
BM25 parameters, so a second mine over the same corpus only tokenizes the queries.

Search (:func:`bm25_top_k`): exact, ties broken by passage index (lower first), as a full sort by (score
descending, index) would. Each query's scores are summed as bm25s sums them, into one vector kept in the CPU cache,
and only the passages that share a term with the query are ranked; queries are spread over threads and, under
several processes, each process tokenizes and searches one contiguous range of them against the main process's
index (read from the cache every process sees) and the ranges are gathered. bm25s's own ``retrieve`` is not used:
with its numpy backend it was measured slower than a plain per-query loop (``scripts/bench_lexical.py``), and its
top-k keeps an arbitrary part of a tie group at the cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from koret.errors import KoretError
from koret.filter_rules import DENSE, LEXICAL
from koret.report import progress

KIWI_CONTENT_TAGS = ("NNG", "NNP", "NR", "VV", "VA", "XR", "SL", "SH", "SN")



@dataclass(frozen=True)
class LexicalSettings:
    """The ``search.lexical`` section as plain values (see :class:`koret.config.LexicalConfig`)."""

    method: str = "bm25"
    tokenizer: str = "kiwi"
    top_k: int = 50
    k1: float = 1.5
    b: float = 0.75


def check_lexical_available() -> None:
    """One line before any model loads when kiwipiepy or bm25s is missing."""
    import importlib.util

    missing = [m for m in ("kiwipiepy", "bm25s") if importlib.util.find_spec(m) is None]
    if missing:
        raise KoretError(f"search.lexical: needs {' and '.join(missing)}, which is not installed",
                         "pip install 'koret[lexical]'")


def _kiwi() -> Any:
    check_lexical_available()
    from kiwipiepy import Kiwi

    return Kiwi(num_workers=_search_threads())  # this process's share of the CPUs, not every core per process


def tokenize(texts: Sequence[str], kiwi: Any | None = None) -> list[list[str]]:
    """Content morphemes of each text (NFC first, so NFC and NFD spellings give the same tokens)."""
    kiwi = kiwi or _kiwi()
    normalized = [unicodedata.normalize("NFC", t) for t in texts]
    return [[tok.form.lower() if tok.tag == "SL" else tok.form for tok in toks
             if tok.tag.split("-", 1)[0] in KIWI_CONTENT_TAGS]  # VV-I (irregular stem) counts as VV
            for toks in kiwi.tokenize(normalized)]


def _tokenizer_identity() -> str:
    """What the index's tokens depend on; part of the cache key, so an index tokenized otherwise (an older koret
    that dropped irregular stems, another Kiwi) is rebuilt rather than reused."""
    import kiwipiepy

    return f"kiwi-{kiwipiepy.__version__}:{','.join(KIWI_CONTENT_TAGS)}:base-tag:nfc"


def index_key(corpus: Sequence[str], settings: LexicalSettings) -> str:
    """Cache key of a BM25 index: the corpus texts, the tokenizer and its version, k1 and b."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"tokenizer": _tokenizer_identity(), "method": settings.method, "k1": settings.k1,
                         "b": settings.b, "passages": len(corpus)}).encode())
    for text in corpus:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_index(corpus: Sequence[str], settings: LexicalSettings, cache_dir: str | Path | None = None,
                kiwi: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """The BM25 index of ``corpus``, from the cache when there is one; returns (index, stats)."""
    import bm25s

    t0 = time.perf_counter()
    folder = Path(cache_dir).expanduser() / "lexical" / index_key(corpus, settings) if cache_dir else None
    if folder is not None and (folder / "koret.json").exists():
        index = bm25s.BM25.load(str(folder), show_progress=False)
        return index, {"cached": True, "seconds": time.perf_counter() - t0, "folder": str(folder)}
    kiwi = kiwi or _kiwi()
    tokens: list[list[str]] = []
    with progress() as bar:
        task = bar.add_task("tokenize passages (kiwi)", total=len(corpus), unit="passages")
        for start in range(0, len(corpus), 2048):
            chunk = corpus[start:start + 2048]
            tokens.extend(tokenize(chunk, kiwi))
            bar.update(task, advance=len(chunk))
    index = bm25s.BM25(k1=settings.k1, b=settings.b, method="lucene")
    index.index(tokens, show_progress=False)
    if folder is not None:  # write beside, then rename: a killed run leaves no half-written index
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        index.save(str(tmp), show_progress=False)
        (tmp / "koret.json").write_text(json.dumps({**asdict(settings), "tokenizer": _tokenizer_identity(),
                                                    "passages": len(corpus)}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return index, {"cached": False, "seconds": time.perf_counter() - t0,
                   "folder": str(folder) if folder else None}


def bm25_scores(index: Any, query_tokens: Sequence[str]) -> np.ndarray:
    """BM25 score of every passage for one tokenized query (terms absent from the corpus add nothing)."""
    vocab = index.vocab_dict
    ids = [vocab[t] for t in query_tokens if t in vocab]
    if not ids:
        return np.zeros(index.scores["num_docs"], dtype=np.float32)
    return np.asarray(index.get_scores_from_ids(ids), dtype=np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best positive scores, best first, ties by index (fewer when fewer score above 0)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # a tie group at the cut may straddle it: take every passage scoring at least the k-th score, then cut
    kth = scores[part].min() if len(part) else 0.0
    cand = np.flatnonzero(scores >= kth)
    cand = cand[np.lexsort((cand, -scores[cand]))][:k]
    return cand[scores[cand] > 0]


def reference_top_k(index: Any, query_tokens: Sequence[Sequence[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition :func:`bm25_top_k` must equal, bit for bit: one query at a time, a full score vector
    (:func:`bm25_scores`) and its :func:`top_k` (the search koret ran before; the tests and
    ``scripts/bench_lexical.py`` compare against it)."""
    k = min(k, int(index.scores["num_docs"]))
    ids = np.full((len(query_tokens), k), -1, dtype=np.int64)
    scores = np.zeros((len(query_tokens), k), dtype=np.float32)
    for q, toks in enumerate(query_tokens):
        full = bm25_scores(index, toks)
        best = top_k(full, k)
        ids[q, : len(best)], scores[q, : len(best)] = best, full[best]
    return ids, scores


def bm25_top_k(index: Any, query_tokens: Sequence[Sequence[str]], k: int,
               n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per tokenized query, the ``k`` best passages by BM25 and their scores, best first, ties by passage index,
    positive scores only: (Q, k) int64 ids, -1 padded, and (Q, k) float32 scores, 0 padded. Row ``q`` equals
    ``top_k(bm25_scores(index, query_tokens[q]), k)`` and those scores, bit for bit.

    Each query is scored into one reused vector that stays in the CPU cache (a block of queries x passages does
    not, and was measured slower); queries are spread over ``n_threads`` threads, numpy releasing the GIL in its
    array loops.
    """
    if getattr(index, "nonoccurrence_array", None) is not None:  # BM25L / BM25+; build_index makes Lucene's
        raise ValueError("bm25_top_k: indexes with non-occurrence scores are not supported")
    n_docs = int(index.scores["num_docs"])
    k = min(k, n_docs)
    ids = np.full((len(query_tokens), k), -1, dtype=np.int64)
    scores = np.zeros((len(query_tokens), k), dtype=np.float32)
    if k == 0 or not len(query_tokens):
        return ids, scores
    vocab = index.vocab_dict
    token_ids = [[vocab[t] for t in q if t in vocab] for q in query_tokens]
    arrays = index.scores["data"], index.scores["indices"], index.scores["indptr"]

    def run(rows: range) -> None:
        neg = np.zeros(n_docs, dtype=np.float32)
        for q in rows:
            best, best_scores = _query_top_k(*arrays, token_ids[q], k, neg)
            ids[q, : len(best)], scores[q, : len(best)] = best, best_scores

    size = max(1, min(256, -(-len(token_ids) // max(1, n_threads))))
    parts = [range(a, min(a + size, len(token_ids))) for a in range(0, len(token_ids), size)]
    if n_threads <= 1 or len(parts) == 1:
        for part in parts:
            run(part)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(run, parts))
    return ids, scores


def _query_top_k(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, terms: list[int], k: int,
                 neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query of :func:`bm25_top_k` (``0 < k <= len(neg)``, ``neg`` a scratch vector): its ids and scores.

    The scores are summed negated, term by term in query order, as bm25s sums them ((-a) - b == -(a + b) exactly
    in IEEE arithmetic); the passages scoring above 0 are partitioned for the ``k``-th best score, every one
    scoring at least that (a tie group may straddle the cut) is sorted by (score descending, index) and the list
    cut to ``k``. ``neg`` is all zeros on entry and on return; a query with few postings touches only those, one
    with many scans the vector once (sorting many postings was measured 8x slower than the scan).
    """
    if not terms:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    postings = sum(int(indptr[t + 1] - indptr[t]) for t in terms)
    for t in terms:
        s, e = indptr[t], indptr[t + 1]
        np.subtract.at(neg, indices[s:e], data[s:e])
    if postings * 16 < len(neg):  # few postings: sort the touched passages instead of scanning all
        cand = np.unique(np.concatenate([indices[indptr[t]:indptr[t + 1]] for t in terms]))
        cand = cand[neg[cand] < 0]
    else:  # one linear scan is cheaper than sorting that many postings (measured: 8x)
        cand = np.flatnonzero(neg < 0)  # the passages that share a term with the query, in index order
    got = neg[cand]
    neg[cand] = 0  # every touched passage is in cand (postings are > 0): clean for the next query
    if len(cand) > k:  # keep those scoring at least the k-th best score (a tie group may straddle the cut)
        keep = got <= np.partition(got, k - 1)[k - 1]
        cand, got = cand[keep], got[keep]
    order = np.lexsort((cand, got))[:k]
    return cand[order], -got[order]


def _search_threads() -> int:
    """Threads for :func:`bm25_top_k` and Kiwi: this process's share of the CPUs of its machine."""
    from koret import dist

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, dist.local_world_size()))


def _shared_index(index: Any, stats: dict[str, Any] | None) -> Any:
    """The main process's index on every process (collective): read from its cache folder, which every process
    sees in a multi-process run (as the embedding cache), or sent when there is none."""
    from koret import dist

    if dist.world_size() <= 1:
        return index
    folder = dist.broadcast_from_main(stats["folder"] if dist.is_main() and stats else None)
    if folder is None:
        return dist.broadcast_from_main(index if dist.is_main() else None)
    if dist.is_main():
        return index
    import bm25s

    return bm25s.BM25.load(folder, show_progress=False, mmap=True)  # one copy in the page cache, not one a process


def lexical_candidates(corpus: Sequence[str], queries: Sequence[str], settings: LexicalSettings,
                       cache_dir: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """BM25 top ``settings.top_k`` passages per query, (Q, top_k) int64, -1 padded, on every process; and stats.

    Collective under several processes: the main process builds (or loads) the index, then each process
    tokenizes and searches one contiguous range of the queries and the ranges are gathered, so the result does
    not depend on the number of processes.
    """
    from koret import dist

    if settings.method != "bm25" or settings.tokenizer != "kiwi":
        raise KoretError(f"search.lexical: method {settings.method!r} with tokenizer {settings.tokenizer!r} is not "
                         "supported", "use method: bm25, tokenizer: kiwi")
    kiwi = _kiwi()
    index, index_stats = build_index(corpus, settings, cache_dir, kiwi) if dist.is_main() else (None, None)
    index = _shared_index(index, index_stats)
    t0 = time.perf_counter()
    mine = dist.slice_of(len(queries), dist.rank(), dist.world_size())
    threads = _search_threads()
    parts = []
    with progress() as bar:
        task = bar.add_task("search (bm25)", total=len(mine), unit="queries")
        for start in range(mine.start, mine.stop, 8192):
            chunk = queries[start:min(start + 8192, mine.stop)]
            parts.append(bm25_top_k(index, tokenize(chunk, kiwi), settings.top_k, threads)[0])
            bar.update(task, advance=len(chunk))
    width = min(settings.top_k, len(corpus))
    local = np.concatenate(parts) if parts else np.full((0, width), -1, dtype=np.int64)
    out = np.concatenate(dist.gather_objects(local))
    found = (out >= 0).sum(axis=1)
    return out, {"method": "bm25", "tokenizer": "kiwi", "top_k": settings.top_k, "k1": settings.k1,
                 "b": settings.b, "index": index_stats, "search_seconds": time.perf_counter() - t0,
                 "search_processes": dist.world_size(), "search_threads": threads,
                 "queries_without_lexical_match": int((found == 0).sum())}


def union_candidates(dense_ids: np.ndarray, dense_scores: np.ndarray, lexical_ids: np.ndarray,
                     lexical_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the union of dense and lexical candidates, every one with its teacher score, best first (ties
    by passage index, as the exact search orders them); -1 / -inf padded. Pure.

    ``dense_scores`` / ``lexical_scores`` are the same teacher's exact scores of ``dense_ids`` / ``lexical_ids``
    (a passage found by both has the same score in both). Returns (ids, scores, sources), sources being
    :data:`DENSE` / :data:`LEXICAL` bit flags (0 on padding).
    """
    n_q = len(dense_ids)
    q_all = np.concatenate([np.repeat(np.arange(n_q), dense_ids.shape[1]),
                            np.repeat(np.arange(n_q), lexical_ids.shape[1])])
    d_all = np.concatenate([dense_ids.ravel(), lexical_ids.ravel()])
    src_all = np.concatenate([np.full(dense_ids.size, DENSE, np.int8), np.full(lexical_ids.size, LEXICAL, np.int8)])
    sc_all = np.concatenate([dense_scores.ravel(), lexical_scores.ravel()]).astype(np.float32)
    ok = d_all >= 0
    q_all, d_all, src_all, sc_all = q_all[ok], d_all[ok], src_all[ok], sc_all[ok]
    # one entry per (query, passage), with the union of its sources and the dense score when there is one
    order = np.lexsort((src_all, d_all, q_all))  # dense (1) before lexical (2) within a pair
    q_all, d_all, src_all, sc_all = q_all[order], d_all[order], src_all[order], sc_all[order]
    first = np.ones(len(q_all), dtype=bool)
    first[1:] = (q_all[1:] != q_all[:-1]) | (d_all[1:] != d_all[:-1])
    starts = np.flatnonzero(first)
    sources = np.bitwise_or.reduceat(src_all, starts) if len(starts) else src_all[:0]
    q_u, d_u, sc_u = q_all[starts], d_all[starts], sc_all[starts]
    # best first per query, ties by passage index
    order = np.lexsort((d_u, -sc_u, q_u))
    q_u, d_u, sc_u, sources = q_u[order], d_u[order], sc_u[order], sources[order]
    counts = np.bincount(q_u, minlength=n_q)
    width = int(counts.max()) if len(counts) else 0
    col = np.arange(len(q_u)) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.full((n_q, width), -1, dtype=np.int64)
    scores = np.full((n_q, width), -np.inf, dtype=np.float32)
    src = np.zeros((n_q, width), dtype=np.int8)
    ids[q_u, col], scores[q_u, col], src[q_u, col] = d_u, sc_u, sources
    return ids, scores, src
