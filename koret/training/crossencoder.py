"""The cross-encoder's parts of ``koret train-reranker``: training rows shaped for each loss, the reranker model,
and the losses (sentence-transformers' own, from ``sentence_transformers.cross_encoder.losses``).

| ``loss.name`` | rows built from a mined ``train.parquet`` | labels |
| --- | --- | --- |
| ``mnrl`` / ``cached_mnrl`` (default) | (anchor, positive, negative_1..N): one positive against N hard negatives and in-batch negatives, the groups of 1 + N FlagEmbedding trains its rerankers with | none |
| ``bce`` | (anchor, passage) pairs: the positive and each hard negative | 1 / 0, ``pos_weight`` |
| ``lambda``, ``listnet`` | (query, [positive, negative_1..N]) | [1, 0, ..., 0] |
| ``margin_mse`` | (anchor, positive, negative_1..N) | the mined scores [positive, negative_1..N] (teacher, or ``rescore.model`` when mining rescored) |

Plain (query, positive) pairs have no hard negatives: only ``mnrl`` / ``cached_mnrl`` (in-batch negatives) and
``bce`` (positives only, which cannot learn to rank) apply; the others say so in one line. Mine's
``candidates.parquet`` (passage ids per query) is read with the ``corpus.parquet`` beside it into the same rows:
each positive with the query's best-scored candidates that are not positives (see :func:`_candidate_tuples`).

References: Burges et al., 2010 (LambdaMART, ``lambda``); Cao et al., 2007 (ListNet); Hofstätter et al., 2020,
arXiv:2010.02666 (Margin-MSE); Xiao et al., 2023, arXiv:2309.07597 (FlagEmbedding's groups of 1 + N).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from koret.config import RerankerConfig
from koret.data import (
    CANDIDATE_COLUMNS,
    detect_format,
    is_candidates_table,
    load_section,
    normalize_text,
    read_table,
    row_selection,
    split_source,
)
from koret.encode import default_device, quiet_transformers, resolve_model_path
from koret.errors import KoretError
from koret.sources import training_source_key
from koret.training.attention import dropout_overrides
from koret.training.common import negative_columns
from koret.training.sources import (
    SOURCE_COLUMN,
    SourceRows,
    check_source_name,
    negatives_text,
    no_rows_error,
    select_source,
    split_rows,
)

LISTWISE = ("lambda", "listnet")


@dataclasses.dataclass
class RerankerData:
    dataset: Any  # datasets.Dataset shaped for the loss (see the module table); several sources: a DatasetDict
    num_negatives: int | str  # of several sources: their range when they differ ("3-7")
    rows: int  # queries (mnrl, listwise, margin_mse) or pairs (bce)
    source: str
    sources: list[SourceRows] | None = None  # several sources: one dataset of the DatasetDict each


_TABLES = ("parquet", "jsonl", "json", "csv", "tsv", "hf_disk")
Rows = tuple[dict[str, list[Any]], int, tuple[list[str], list[str]] | None]


def _mined_tuples(cfg: RerankerConfig, src: Any, key: str, name: str | None) -> Rows | None:
    """anchor, positive, negative_1..N (and scores) from a mined file (train.parquet, or candidates.parquet), or
    None for a pairs source; with a several-source mine's file, the rows of source ``name`` (or, with no name,
    every row's source: (the sources, each row's source))."""
    d = cfg.data
    path, selection = split_source(src.train)
    fmt = detect_format(path, key) if src.format == "auto" else src.format
    if selection is not None or fmt not in _TABLES:
        return None
    df = read_table(path, fmt, key, src.split)
    if is_candidates_table(df.columns):
        return _candidate_tuples(cfg, src, path, [str(c) for c in df.columns], key, name)
    negs = negative_columns(df.columns)
    if "anchor" not in df.columns or not negs:
        return None
    if "positive" not in df.columns:
        raise KoretError(f"{key}: {path}: column 'positive' not found; available columns: "
                         f"{', '.join(map(str, df.columns))}", "a mined file has anchor, positive, negative_1..N")
    if d.num_negatives is not None:
        if d.num_negatives > len(negs):
            raise KoretError(f"data.num_negatives ({d.num_negatives}) is more than the {len(negs)} negative columns "
                             f"of {path}", "mine with more filter.num_negatives")
        negs = negs[: d.num_negatives]
    df, names = select_source(df, path, key, name)  # a several-source mine's file: this source's rows
    df = df.iloc[row_selection(len(df), src)]  # data.limit's first rows, or data.sample's draw
    cols: dict[str, list[Any]] = {}
    for column in ["anchor", "positive", *negs]:
        values = df[column].tolist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise KoretError(f"{key}: {path}: row {df.index[bad[0]]} column {column!r} is empty",
                             "every row needs the same number of negatives: mine with on_shortage drop")
        cols[column] = [normalize_text(v, src.normalize) for v in values]
    if "scores" in df.columns:
        cols["scores"] = [[float(x) for x in s][: 1 + len(negs)] for s in df["scores"].tolist()]
    return cols, len(negs), ((names, df[SOURCE_COLUMN].tolist()) if names else None)


def _candidate_tuples(cfg: RerankerConfig, src: Any, path: str, columns: list[str], key: str,
                      name: str | None) -> Rows:
    """anchor, positive, negative_1..N and scores from koret mine's ``candidates.parquet`` and the
    ``corpus.parquet`` beside it (the texts its passage ids name).

    Per (query, positive): the ``data.num_negatives`` (default 7, mine's own default) best-scored candidates that
    are not a known positive of the query nor a passage with a positive's text: the rows mine writes with
    ``filter.strategy: naive`` (no false-negative filter: a train.parquet mined with a positive-aware rule is safer), by mine's own
    filter code. Rows with fewer such candidates are left out and counted. ``scores`` are the positive's and
    the negatives', the rescore model's when mining rescored, else the teacher's (as in train.parquet). The
    candidates of a several-source mine give each row its query's source (each query's candidates are its own
    source's passages)."""
    from pathlib import Path

    import numpy as np

    from koret.candidates import read_candidates, read_source_index
    from koret.filter_rules import FilterSettings, apply_filter, choose
    from koret.report import info

    d = cfg.data
    missing = [c for c in CANDIDATE_COLUMNS if c not in columns]
    if missing:
        raise KoretError(f"{key}: {path}: a candidates file needs columns {', '.join(CANDIDATE_COLUMNS)}; "
                         f"missing {', '.join(missing)}", "train on the train.parquet koret mine wrote beside it")
    corpus = Path(path).parent / "corpus.parquet"
    if not corpus.exists():
        raise KoretError(f"{key}: {path} names passages by id and the corpus.parquet beside it is missing",
                         "keep koret mine's output folder together, or train on its train.parquet")
    n = d.num_negatives or FilterSettings().num_negatives
    cands, texts, groups = read_candidates(Path(path))
    settings = FilterSettings(strategy="naive", num_negatives=n, max_overlap=None)  # candidates as mined
    choice = choose(cands, groups, settings)
    outcome = apply_filter(cands, texts, groups, settings, choice=choice)
    rows_in, rows_out = outcome.stats["rows_in"], outcome.stats["rows_out"]
    if not rows_out:
        raise KoretError(f"{key}: {path}: no (query, positive) row has {n} candidates that are not positives",
                         "lower data.num_negatives")
    if rows_out < rows_in:
        info(f"{key}: {rows_in - rows_out:,} of {rows_in:,} (query, positive) rows have fewer than {n} "
             "candidates that are not positives and are left out")
    index = read_source_index(Path(path))
    of_row = None
    keep = np.arange(rows_out)
    if index is not None:
        of_row = [index.names[c] for c in index.query_sources()[choice.row_query[choice.kept]].tolist()]
        if name is not None:
            check_source_name(key, path, index.names, name)
            keep = np.asarray([i for i, s in enumerate(of_row) if s == name], dtype=np.int64)
    take = keep[row_selection(len(keep), src)]  # data.limit's first rows, or data.sample's draw
    cols: dict[str, list[Any]] = {column: [normalize_text(values[i], src.normalize) for i in take]
                                  for column, values in outcome.rows.items() if column != "scores"}
    cols["scores"] = [outcome.rows["scores"][i] for i in take]
    sources = (index.names, [of_row[i] for i in take]) if index is not None and name is None else None
    return cols, n, sources


def _source_rows(cfg: RerankerConfig, src: Any, key: str, name: str | None) -> Rows:
    """One source's anchor, positive, negative_* (and scores): mined, or plain pairs through the data layer."""
    mined = _mined_tuples(cfg, src, key, name)
    if mined is None:  # plain pairs through the data layer
        data = load_section(src, "train", key=key)
        mined = ({"anchor": [data.queries[q] for q, _ in data.pairs],
                  "positive": [data.corpus[p] for _, p in data.pairs]}, 0, None)
    if not mined[0]["anchor"]:
        raise no_rows_error(key, src.train, name)
    return mined


def load_reranker_data(cfg: RerankerConfig) -> RerankerData:
    """Rows shaped for ``loss.name`` (see the module table); with several sources (``data.sources``, or a
    several-source mine's file as ``data.train``) a DatasetDict of one dataset per source."""
    from datasets import Dataset, DatasetDict

    d = cfg.data
    if d.sources:
        parts = []
        for src in d.sources:
            key = training_source_key(src)
            cols, n_neg, _ = _source_rows(cfg, src, key, src.name)
            parts.append((SourceRows(src.name, src.train, src.weight, src, None), cols, n_neg))
    else:
        if not d.train:
            raise KoretError("data.train: required key is missing", "point it at runs/mine/train.parquet")
        cols, n_neg, row_sources = _source_rows(cfg, d, "data.train", None)
        split = split_rows(cols, row_sources[1], row_sources[0]) if row_sources is not None else {}
        if len(split) <= 1:
            rows = shape_rows(cfg.loss.name, cols, d.train)
            return RerankerData(Dataset.from_dict(rows), len(negative_columns(cols)), _length(rows), d.train)
        parts = [(SourceRows(name, d.train, 1.0, None, None), c, n_neg) for name, c in split.items()]
    shaped = {}
    for source, cols, _ in parts:
        shaped[source.name] = shape_rows(cfg.loss.name, cols, source.train, source.name)
        source.rows, source.num_negatives = _length(shaped[source.name]), len(negative_columns(cols))
    sources = [p[0] for p in parts]
    return RerankerData(DatasetDict({n: Dataset.from_dict(r) for n, r in shaped.items()}), negatives_text(sources),
                        sum(s.rows for s in sources), ", ".join(shaped), sources)


def _length(rows: dict[str, list[Any]]) -> int:
    return len(next(iter(rows.values())))


def shape_rows(name: str, cols: dict[str, list[Any]], train: str, source: str | None = None) -> dict[str, list[Any]]:
    """The columns ``loss.name`` trains on (see the module table), from anchor, positive, negative_* (and scores)
    of ``train`` (of its ``source``, named in errors, when it has several)."""
    where = f"{train} (source {source})" if source else train
    negs = negative_columns(cols)
    if name in ("lambda", "listnet", "margin_mse") and not negs:
        raise KoretError(f"loss.name {name}: needs hard negatives, and {where} has only (query, positive) pairs",
                         "mine first (koret mine), or use loss mnrl / cached_mnrl")
    if name in ("mnrl", "cached_mnrl"):
        return {k: cols[k] for k in ["anchor", "positive", *negs]}
    if name == "bce":
        anchors, passages, labels = [], [], []
        for i, q in enumerate(cols["anchor"]):
            for j, col in enumerate(["positive", *negs]):
                anchors.append(q)
                passages.append(cols[col][i])
                labels.append(1.0 if j == 0 else 0.0)
        return {"anchor": anchors, "passage": passages, "label": labels}
    if name in LISTWISE:
        return {"query": cols["anchor"],
                "docs": [[cols[c][i] for c in ["positive", *negs]] for i in range(len(cols["anchor"]))],
                "labels": [[1.0] + [0.0] * len(negs) for _ in cols["anchor"]]}
    # margin_mse: the mined scores are the gold similarities
    if "scores" not in cols:
        raise KoretError(f"loss.name margin_mse: {where} has no 'scores' column (the teacher's scores of the "
                         "positive and each negative)", "use a train.parquet written by koret mine")
    short = [i for i, s in enumerate(cols["scores"]) if len(s) != 1 + len(negs)]
    if short:
        raise KoretError(f"loss.name margin_mse: row {short[0]} of {where} has {len(cols['scores'][short[0]])} "
                         f"scores for {1 + len(negs)} passages", "re-mine: every row needs a score per passage")
    rows = {k: cols[k] for k in ["anchor", "positive", *negs]}
    rows["label"] = margin_labels(cols["scores"], train)
    return rows


def margin_labels(scores: list[Any], source: str) -> list[list[float]]:
    """margin_mse's labels: the student's logit margins are fitted to these margins, so they must be logits too.
    Scores recorded as a cross-encoder's sigmoid are read back as logits (as distillation reads them); teacher
    cosines stay as they are, with a warning: their margins (a few hundredths) ask for near-equal logits."""
    import numpy as np

    from koret.candidates import CROSS_ENCODER_SIGMOID, TEACHER_COSINE
    from koret.report import warn
    from koret.training.distill import score_kind_of

    kind = score_kind_of(source)
    if kind == CROSS_ENCODER_SIGMOID:
        eps = 2.0**-24
        return [(np.log(np.clip(p, eps, 1 - eps)) - np.log1p(-np.clip(p, eps, 1 - eps))).tolist()
                for p in (np.asarray(row, dtype=np.float64) for row in scores)]
    if kind == TEACHER_COSINE:
        warn(f"loss.name margin_mse: {source}'s scores are the mining teacher's cosines: the reranker's logit "
             "margins are fitted to cosine margins of a few hundredths; mine with rescore.model (a cross-encoder) "
             "for logit targets")
    return [list(map(float, row)) for row in scores]


HELD_OUT_METRICS = ("ndcg@10", "mrr@10", "map@10", "recall@10")


@dataclasses.dataclass
class HeldOutCandidates:
    """The retriever's top-k candidates of held-out queries, as ``koret mine`` wrote them (candidates.parquet).

    ``candidates[q]`` holds indices into ``texts`` (-1 padded), ``retriever_scores[q]`` the retriever's (mine's
    teacher's) scores aligned with them; ``passage_ids`` maps an index to the passage's corpus id, which
    ``qrels[q]`` (the query's positives, whether the retriever found them or not) is keyed by."""

    queries: list[str]
    candidates: Any  # np.ndarray (Q, K) int64
    retriever_scores: Any  # np.ndarray (Q, K) float32, -inf padded
    texts: list[str]
    doc_ids: list[str]  # per index: the corpus doc id (trec_eval breaks ties by it, descending)
    passage_ids: Any  # np.ndarray (len(texts),) int64
    qrels: list[dict[int, int]]

    def pairs(self) -> list[tuple[str, str]]:
        """(query, passage) for every candidate, row by row: the order of ``scores[candidates >= 0]``."""
        return [(self.queries[q], self.texts[i]) for q, row in enumerate(self.candidates) for i in row if i >= 0]

    def metrics(self, scores: Any) -> dict[str, float]:
        """``HELD_OUT_METRICS`` (trec_eval's definitions, :mod:`koret.metrics`) of each query's candidates
        ordered by ``scores`` (aligned with ``candidates``), ties as trec_eval breaks them, as ``koret eval``."""
        from koret.evaluate import doc_rank_desc, trec_order
        from koret.metrics import mean_metrics, query_metrics

        ids, _ = trec_order(self.candidates, scores, doc_rank_desc(self.doc_ids))
        mean = mean_metrics([query_metrics(self.passage_ids[row[row >= 0]].tolist(), qrels, [10])
                             for row, qrels in zip(ids, self.qrels, strict=True)])
        return {k: mean[k] for k in HELD_OUT_METRICS}

    def rerank_scores(self, model: Any, batch_size: int) -> Any:
        """The CrossEncoder's score of every candidate, aligned with ``candidates`` (-inf padded)."""
        import numpy as np

        valid = self.candidates >= 0
        scores = np.full(self.candidates.shape, -np.inf, dtype=np.float32)
        import torch

        # raw logits: a float32 sigmoid makes a confident reranker's top candidates exact ties at 1.0
        flat = model.predict(self.pairs(), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                             activation_fn=torch.nn.Identity())
        scores[valid] = np.asarray(flat, dtype=np.float32).reshape(-1)
        return scores


def read_held_out(cfg: RerankerConfig) -> HeldOutCandidates:
    """``data.eval`` (a ``koret mine`` output folder of held-out queries, or its train.parquet / candidates.parquet):
    the first ``data.eval_max_queries`` queries of its candidates.parquet, with the texts from corpus.parquet. Only
    the dense (retrieved) candidates: those BM25 alone added (``search.lexical``) are not the retriever's."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from koret.data import CANDIDATE_COLUMNS

    d = cfg.data
    path, _ = split_source(d.eval)
    given = Path(path).expanduser()
    folder = given if given.is_dir() else given.parent
    cands_path, corpus_path = folder / "candidates.parquet", folder / "corpus.parquet"
    if not cands_path.exists() or not corpus_path.exists():
        raise KoretError(f"data.eval: {d.eval}: no candidates.parquet and corpus.parquet in {folder} (the "
                         "retriever's top-k candidates of the held-out queries, which koret mine writes)",
                         "mine the held-out queries with the retriever as teacher (koret mine --set "
                         "data.train=HELD_OUT --set output.dir=DIR) and set data.eval to DIR")
    try:
        table = pq.read_table(cands_path)
        corpus = pq.read_table(corpus_path, columns=["doc_id", "text"])
    except Exception as exc:
        raise KoretError(f"data.eval: {folder}: unreadable candidates.parquet / corpus.parquet "
                         f"({str(exc).splitlines()[0][:200]})", "mine the held-out queries again") from exc
    missing = [c for c in CANDIDATE_COLUMNS if c not in table.column_names]
    if missing:
        raise KoretError(f"data.eval: {cands_path}: missing columns {', '.join(missing)}",
                         "was it written by koret mine? mine the held-out queries again")
    if d.eval_max_queries:
        table = table.slice(0, d.eval_max_queries)
    # the teacher's scores, also when mining rescored: the retriever's order is the baseline
    # (with search.lexical the candidates are the union of the dense and BM25 ones: the retriever's are the dense)
    lexical = "candidate_sources" in table.column_names
    rows = table.select(["query", "positive_ids", "candidate_ids", "teacher_candidate_scores",
                         *(["candidate_sources"] if lexical else [])]).to_pylist()
    if not rows:
        raise KoretError(f"data.eval: {cands_path}: no queries")
    for r in rows:
        if lexical:
            dense = [s != "lexical" for s in r["candidate_sources"]]
            r["candidate_ids"] = [c for c, keep in zip(r["candidate_ids"], dense, strict=True) if keep]
            r["teacher_candidate_scores"] = [c for c, keep in zip(r["teacher_candidate_scores"], dense, strict=True)
                                             if keep]
    width = max(1, max(len(r["candidate_ids"]) for r in rows))
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    scores = np.full((len(rows), width), -np.inf, dtype=np.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r["candidate_ids"])] = r["candidate_ids"]
        scores[i, : len(r["candidate_ids"])] = r["teacher_candidate_scores"]
    used = np.unique(ids[ids >= 0])
    if len(used) and used[-1] >= corpus.num_rows:
        raise KoretError(f"data.eval: {cands_path}: passage id {int(used[-1])} is not one of the "
                         f"{corpus.num_rows:,} passages of {corpus_path}", "mine the held-out queries again")
    picked = corpus.take(pa.array(used))
    return HeldOutCandidates(
        queries=[normalize_text(r["query"], d.normalize) for r in rows],
        candidates=np.where(ids >= 0, used.searchsorted(np.maximum(ids, 0)), -1),
        retriever_scores=scores,
        texts=[normalize_text(t, d.normalize) for t in picked.column("text").to_pylist()],
        doc_ids=[str(x) for x in picked.column("doc_id").to_pylist()],
        passage_ids=used,
        qrels=[{int(p): 1 for p in r["positive_ids"]} for r in rows])


def reranking_evaluator(cfg: RerankerConfig) -> Any:
    """The held-out reranking evaluated during training (``data.eval``, see :func:`read_held_out`): the
    retriever's top-k candidates of held-out queries reordered by the reranker being trained, scored with
    ``koret eval``'s metrics and tie order; ``base_*`` are the retriever's own order of the same candidates.

    These are the candidates ``koret eval --reranker`` reorders when the mine's teacher is the retriever: its top
    ``search.top_k`` per query, a positive only where the retriever found it. train.parquet's negatives are not
    used: filtering keeps only negatives the teacher scores below the positive, so their teacher order ranks
    the positive first and that baseline is 1.0 by construction. Metrics (``eval_ndcg@10``,
    ``eval_base_ndcg@10``, ...): NDCG, MRR, MAP and recall at 10."""
    from sentence_transformers.base.evaluation import BaseEvaluator

    held = read_held_out(cfg)
    batch_size = int(cfg.args.get("per_device_eval_batch_size", 32))
    base = held.metrics(held.retriever_scores)  # fixed: computed once

    class HeldOutReranking(BaseEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.name = "eval"
            self.primary_metric = "ndcg@10"

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1,
                     steps: int = -1) -> dict[str, float]:
            reranked = held.metrics(held.rerank_scores(model, batch_size))
            metrics = self.prefix_name_to_metrics({**reranked, **{f"base_{k}": v for k, v in base.items()}},
                                                  self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

        def get_config_dict(self) -> dict[str, Any]:
            return {"queries": len(held.queries), "candidates": int((held.candidates >= 0).sum())}

    return HeldOutReranking()


DEFAULT_MAX_LENGTH = 512  # tokens of a (query, passage) pair when model.max_length is None


def load_reranker(cfg: RerankerConfig) -> Any:
    """A CrossEncoder from a CrossEncoder folder / Hub id, a plain encoder with a new one-logit head, or a causal
    LM scored by its 'yes' / 'no' logits (sentence-transformers' LogitScore, as Qwen3-Reranker).

    Memory of training: attention through ``model.attn_implementation`` (auto: PyTorch's
    scaled_dot_product_attention, ``sdpa``, or flash-attention 2 where installed on a GPU; an architecture without
    SDPA keeps its own), weights in ``model.dtype``, ``model.attention_dropout`` (:mod:`koret.training.attention`;
    the model's own values, which the saved configs keep, as ``model.koret_own_dropout``), and pairs cut at
    ``model.max_length`` (default :data:`DEFAULT_MAX_LENGTH`, or the model's own maximum when smaller); the losses
    tokenize each batch padded to its longest pair."""
    from sentence_transformers import CrossEncoder

    name = cfg.model.name
    if not name:
        raise KoretError("model.name: required key is missing", "a CrossEncoder (e.g. BAAI/bge-reranker-v2-m3) "
                                                                  "or an encoder Hub id / folder")
    ref = resolve_model_path(name, "model.name")
    quiet_transformers()
    import torch

    from koret.encode import load_kwargs, without_sdpa
    from koret.training.lora import base_dtype

    overrides, own = dropout_overrides(cfg.model.attention_dropout, ref, torch.cuda.is_available())
    device = default_device()
    weights = load_kwargs(base_dtype(cfg.model.dtype, cfg.model.lora is not None, device), device,
                          cfg.model.attn_implementation)
    kwargs = {"num_labels": 1, "max_length": cfg.model.max_length, "device": device}
    try:
        try:
            model = CrossEncoder(ref, model_kwargs=weights, config_kwargs=dict(overrides), **kwargs)
        except ValueError as exc:  # an architecture without SDPA: its own attention
            if not without_sdpa(exc, weights, cfg.model.attn_implementation):
                raise
            model = CrossEncoder(ref, model_kwargs={"dtype": weights["dtype"]}, config_kwargs=dict(overrides),
                                 **kwargs)
    except (OSError, ValueError) as exc:
        raise KoretError(f"model.name: could not load {name!r} as a cross-encoder "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if model.num_labels != 1:
        raise KoretError(f"model.name: {name!r} has {model.num_labels} output labels; a reranker has one",
                         "use a one-logit reranker, or a plain encoder (koret adds a one-logit head)")
    if cfg.model.max_length is None:
        positions = getattr(model.model.config, "max_position_embeddings", None)
        model.max_seq_length = min(x for x in (DEFAULT_MAX_LENGTH, model.max_seq_length, positions) if x)
    model.koret_own_dropout = own  # the model's own values, which the saved configs keep
    return model


def build_reranker_loss(cfg: RerankerConfig, model: Any) -> Any:
    """The configured sentence-transformers cross-encoder loss."""
    import torch
    from sentence_transformers.cross_encoder import losses

    lc = cfg.loss
    if lc.name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model, num_negatives=lc.in_batch_negatives, scale=lc.scale)
    if lc.name == "cached_mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, num_negatives=lc.in_batch_negatives, scale=lc.scale,
                                                         mini_batch_size=lc.mini_batch_size)
    if lc.name == "bce":
        weight = torch.tensor(lc.pos_weight) if lc.pos_weight is not None else None
        return losses.BinaryCrossEntropyLoss(model, pos_weight=weight)
    if lc.name == "lambda":
        return losses.LambdaLoss(model)
    if lc.name == "listnet":
        return losses.ListNetLoss(model)
    return losses.MarginMSELoss(model)
