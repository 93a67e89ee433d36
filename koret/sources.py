"""Several named sources in one run (``data.sources``): reading them, mining each within its own passages, and
the order in which training draws their batches.

Mining (``koret mine``): every source is read as ``data.train`` would be; the sources' passages are merged into
one corpus, a text that occurs in several sources once (so it is encoded once: the embedding cache keys shards by
their texts), and ``data.corpus``, when set, is added to every source's passages. A :class:`SourceIndex` records
which queries (one contiguous range per source, in the order of the list) and which passages (its *pool*: its
positives, its own corpus and the shared corpus) belong to each source. Each source's queries are searched within
its pool only and filtered with its pool as the corpus (``pad_random`` draws from it), so every negative of a
row comes from the row's own source. ``candidates.parquet`` keeps a ``source`` column and ``corpus.parquet`` a
``sources`` column (the sources whose pool holds the passage), from which ``koret filter`` rebuilds the index.

Training (``koret train``, ``koret train-reranker``): each source is one dataset of a ``DatasetDict`` and every
batch holds rows of one source. :func:`batch_plan` says which source each batch comes from:

- ``proportional`` (default): over an epoch of ``D = sum(b)`` draws, source ``s`` is drawn
  ``round(D * w_s * b_s / sum(w * b))`` times (largest remainder), where ``b_s`` is its number of batches and
  ``w_s`` its weight; the draws come in a random order seeded by (``args.seed``, epoch), the same on every
  process. Equal weights give each source exactly its batches (sentence-transformers' PROPORTIONAL sampler); a
  source drawn more often than it has batches starts over (reshuffled), one drawn less leaves rows unused that
  epoch. With weights 3:1 on sources of equal size, 3/4 of the batches come from the first.
- ``round_robin``: the sources in the order of the list, one draw each, until one has no batch left
  (sentence-transformers' ROUND_ROBIN: every source gives the same number of batches).

With several processes one draw is one batch per process, so every process trains on the same source at each
step (and ``loss.gather_across_devices`` gathers one source's rows).

The functions here are pure (numpy and :mod:`koret.data` only); the stages call them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from koret.data import RetrievalData, load_section, normalize_text
from koret.errors import KoretError
from koret.filter_rules import Candidates, Choice, join_choices

# --------------------------------------------------------------------------------------------- the index


@dataclass
class SourceIndex:
    """Which queries and passages of a merged mining run belong to each source.

    ``query_starts[s]:query_starts[s + 1]`` are source ``s``'s queries; ``passages[s]`` its pool, sorted global
    passage indices (the passages its queries' candidates may come from)."""

    names: list[str]
    query_starts: np.ndarray  # (S + 1,) int64
    passages: list[np.ndarray]  # S arrays of sorted int64

    def query_range(self, s: int) -> range:
        return range(int(self.query_starts[s]), int(self.query_starts[s + 1]))

    def query_sources(self) -> np.ndarray:
        """(Q,) the source (index into ``names``) of every query."""
        return np.repeat(np.arange(len(self.names)), np.diff(self.query_starts))

    def passage_sources(self, n_passages: int) -> list[list[str]]:
        """The names of the sources whose pool holds each passage (for ``corpus.parquet``)."""
        out: list[list[str]] = [[] for _ in range(n_passages)]
        for name, pool in zip(self.names, self.passages, strict=True):
            for p in pool.tolist():
                out[p].append(name)
        return out

    @classmethod
    def from_columns(cls, query_sources: Sequence[str], passage_sources: Sequence[Sequence[str]],
                     where: str) -> SourceIndex:
        """Rebuild the index from ``candidates.parquet``'s ``source`` and ``corpus.parquet``'s ``sources``."""
        names: list[str] = []
        starts = [0]
        for q, name in enumerate(query_sources):
            if not names or name != names[-1]:
                if name in names:
                    raise KoretError(f"filter.candidates: {where}: the queries of source {name!r} are not together "
                                     "(koret mine writes each source's queries in one run)", "mine again")
                names.append(name)
                if q:
                    starts.append(q)
        starts.append(len(query_sources))
        pools: dict[str, list[int]] = {n: [] for n in names}
        for p, held in enumerate(passage_sources):
            for name in held:
                if name in pools:
                    pools[name].append(p)
        return cls(names, np.asarray(starts, dtype=np.int64), [np.asarray(pools[n], dtype=np.int64) for n in names])


# --------------------------------------------------------------------------------------------- reading


def source_key(name: str, field: str = "train") -> str:
    """How errors name a source's key: ``data.sources.<name>.train``."""
    return f"data.sources.{name}.{field}"


def training_source_key(src: Any) -> str:
    """A training source's ``train`` key, which it must have (koret run fills it from the mine before)."""
    key = source_key(src.name)
    if not src.train:
        raise KoretError(f"{key}: required key is missing", "point it at this source's train.parquet or pairs")
    return key


def load_mine_sources(section: Any) -> tuple[RetrievalData, SourceIndex, dict[str, dict[str, Any]]]:
    """Read every source of a mine config's ``data.sources`` (queries without a positive skipped, as for one
    source) and merge them (see the module doc). Returns the merged data, the index and each source's reading
    record (for stats.json). Raises a one-line error naming the source that has no rows."""
    parts: list[tuple[str, RetrievalData]] = []
    for src in section.sources:
        if not src.train:
            raise KoretError(f"{source_key(src.name)}: required key is missing",
                             "set it to this source's (query, positive) data")
        try:
            data = load_section(src, key=source_key(src.name)).with_positives_only()
        except KoretError as exc:
            if source_key(src.name) in exc.message:
                raise
            raise KoretError(f"data.sources.{src.name}: {exc.message}", exc.hint) from exc
        if not data.pairs:
            raise KoretError(f"data.sources.{src.name}: {src.train}: no (query, positive) rows after reading",
                             "check the file, its columns and data.limit / data.sample")
        parts.append((src.name, data))
    shared: list[str] = []
    if section.corpus:
        from koret.data import iter_passages

        texts = iter_passages(section.corpus, section.corpus_format, section.corpus_column, "data.corpus")
        shared = [t for t in (normalize_text(str(x), section.normalize) for x in texts) if t.strip()]
    merged, index = merge_sources(parts, shared)
    records = {name: {"source": d.source, "format": d.format, "fingerprint": d.fingerprint(),
                      "queries": len(d.queries), "pairs": len(d.pairs), "passages": len(d.corpus),
                      "pool": len(index.passages[s]), "positive_passages": d.num_positive_passages,
                      "skipped": d.counts} for s, (name, d) in enumerate(parts)}
    return merged, index, records


def merge_sources(parts: Sequence[tuple[str, RetrievalData]], shared: Sequence[str] = ()) -> tuple[
        RetrievalData, SourceIndex]:
    """One :class:`RetrievalData` of several sources: their queries one after another (a query text in two
    sources stays two queries: its candidates differ), one corpus in which each distinct passage text is one
    entry (the sources' passages in order, then the ``shared`` ones), and the index. Pure."""
    corpus: list[str] = []
    doc_ids: list[str] = []
    at: dict[str, int] = {}

    def intern(text: str, doc_id: str) -> int:
        i = at.get(text)
        if i is None:
            i = at[text] = len(corpus)
            corpus.append(text)
            doc_ids.append(doc_id)
        return i

    locals_ = [np.asarray([intern(t, f"{name}/{i}") for t, i in zip(d.corpus, d.doc_ids, strict=True)],
                          dtype=np.int64) for name, d in parts]
    shared_ids = np.asarray([intern(t, f"corpus/{i}") for i, t in enumerate(shared)], dtype=np.int64)
    queries: list[str] = []
    query_ids: list[str] = []
    qrels: list[dict[int, int]] = []
    pairs: list[tuple[int, int]] = []
    starts = [0]
    pools = []
    counts: dict[str, int] = {}
    for (name, d), local in zip(parts, locals_, strict=True):
        q0 = len(queries)
        queries += d.queries
        query_ids += d.query_ids
        qrels += [{int(local[p]): g for p, g in rel.items()} for rel in d.qrels]
        pairs += [(q0 + q, int(local[p])) for q, p in d.pairs]
        starts.append(len(queries))
        pools.append(np.unique(np.concatenate([local, shared_ids])))
        for what, n in d.counts.items():
            counts[f"{name}: {what}"] = n
    first: dict[str, int] = {}  # passages equal after NFC (a source read with normalize: none) are one group
    groups = [first.setdefault(normalize_text(t, "nfc"), i) for i, t in enumerate(corpus)]
    names = [name for name, _ in parts]
    merged = RetrievalData(queries, corpus, qrels, pairs, query_ids, doc_ids, groups, ", ".join(names), "sources",
                           notes=[n for name, d in parts for n in (f"{name}: {x}" for x in d.notes)], counts=counts)
    return merged, SourceIndex(names, np.asarray(starts, dtype=np.int64), pools)


# --------------------------------------------------------------------------------------------- filtering


def _local(cands: Candidates, queries: range, pool: np.ndarray) -> Candidates:
    """A source's candidates with passage ids into its pool (``pool[i]`` is global passage ``i``'s index)."""
    part = cands.take(queries)

    def to_pool(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(pool, np.maximum(ids, 0)).clip(0, max(len(pool) - 1, 0))
        ok = (ids < 0) | (pool[at] == ids) if len(pool) else ids < 0
        if not ok.all():
            raise KoretError(f"candidates: passage {int(ids[~ok][0])} is not a passage of its query's source",
                             "the candidates and corpus.parquet do not belong together: mine again")
        return np.where(ids >= 0, at, -1)

    return replace(part, positive_ids=[to_pool(p) for p in part.positive_ids],
                   candidate_ids=to_pool(part.candidate_ids))


def _global(choice: Choice, pool: np.ndarray) -> Choice:
    """A choice made over a source's pool, with global passage indices again."""
    neg = choice.negative_ids
    return replace(choice, row_positive=pool[choice.row_positive],
                   negative_ids=np.where(neg >= 0, pool[np.maximum(neg, 0)], -1))


ChooseRange = Callable[..., "Choice | None"]


def choose_by_source(cands: Candidates | None, groups: np.ndarray, settings: Any, index: SourceIndex,
                     score: Any, choose_range: ChooseRange) -> tuple[Choice | None, list[Choice]]:
    """The filter's choice, made source by source with each source's pool as the corpus (its known positives, its
    candidates, ``pad_random``'s draws), joined into the choice over all the queries; and each source's part.

    ``choose_range(cands, n_queries, groups, settings, score, first_query=, first_row=)`` is
    :func:`koret.mine.choose_by_query_range` (collective: every process calls this with the same index, the
    candidates on the main process only) or a plain :func:`koret.filter_rules.choose`. Random draws are keyed by
    global row, so the rows equal what filtering all the queries at once would give (with the pool as corpus)."""
    rows_before = (np.concatenate([[0], np.cumsum([len(p) for p in cands.positive_ids])])
                   if cands is not None else None)
    parts: list[Choice] = []
    for s, pool in enumerate(index.passages):
        queries = index.query_range(s)
        local = _local(cands, queries, pool) if cands is not None else None

        def local_score(qs: np.ndarray, ps: np.ndarray, pool: np.ndarray = pool) -> np.ndarray:
            return score(qs, pool[np.asarray(ps, dtype=np.int64)])

        first_row = int(rows_before[queries.start]) if rows_before is not None else 0
        choice = choose_range(local, len(queries), np.asarray(groups)[pool], settings,
                              local_score if score is not None else None, first_query=queries.start,
                              first_row=first_row)
        if choice is not None:
            parts.append(_global(choice, pool))
    if not parts:
        return None, []
    return join_choices(parts), parts


def row_sources(choice: Choice, index: SourceIndex) -> list[str]:
    """The source name of every row ``choice`` keeps (train.parquet's ``source`` column)."""
    codes = index.query_sources()[choice.row_query[np.flatnonzero(choice.kept)]]
    return [index.names[c] for c in codes.tolist()]


# --------------------------------------------------------------------------------------------- training


def batch_plan(batches: Sequence[int], weights: Sequence[float], sampler: str, seed: int, epoch: int) -> np.ndarray:
    """Which source (index) each draw of one epoch comes from (see the module doc). Pure and deterministic:
    every process computes the same plan from (``seed``, ``epoch``)."""
    b = np.asarray(batches, dtype=np.int64)
    if sampler == "round_robin":
        return np.tile(np.arange(len(b)), int(b.min()) if len(b) else 0)
    if sampler != "proportional":
        raise KoretError(f"data.sampler: unknown value {sampler!r}", "use proportional or round_robin")
    counts = draw_counts(b, weights)
    order = np.repeat(np.arange(len(b)), counts)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(order)


def draw_counts(batches: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Draws of each source in an epoch of ``sum(batches)`` draws: shares proportional to weight x batches,
    rounded by largest remainder (ties to the earlier source) so they sum to the total. Pure."""
    b = np.asarray(batches, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    total = int(b.sum())
    if total == 0:
        return np.zeros(len(b), dtype=np.int64)
    quota = total * (w * b) / (w * b).sum()
    counts = np.floor(quota + 1e-9).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.lexsort((np.arange(len(b)), -(quota - counts)))
        counts[order[:rest]] += 1
    return counts
