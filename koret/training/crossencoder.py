"""The cross-encoder's parts of ``koret train-reranker``: training rows shaped for each loss, the reranker model,
and the losses (sentence-transformers' own, from ``sentence_transformers.cross_encoder.losses``).

| ``loss.name`` | rows built from a mined ``train.parquet`` | labels |
| --- | --- | --- |
| ``mnrl`` / ``cached_mnrl`` (default) | (anchor, positive, negative_1..N): one positive against N hard negatives and in-batch negatives, the groups of 1 + N FlagEmbedding trains its rerankers with | none |
| ``bce`` | (anchor, passage) pairs: the positive and each hard negative | 1 / 0, ``pos_weight`` |
| ``lambda``, ``listnet`` | (query, [positive, negative_1..N]) | [1, 0, ..., 0] |
| ``margin_mse`` | (anchor, positive, negative_1..N) | the mined scores [positive, negative_1..N] (teacher, or ``rescore.model`` when mining rescored) |

Plain (query, positive) pairs have no hard negatives: only ``mnrl`` / ``cached_mnrl`` (in-batch negatives) and
``bce`` (positives only, which cannot learn to rank) apply; the others say so in one line.

References: Burges et al., 2010 (LambdaMART, ``lambda``); Cao et al., 2007 (ListNet); Hofstätter et al., 2020,
arXiv:2010.02666 (Margin-MSE); Xiao et al., 2023, arXiv:2309.07597 (FlagEmbedding's groups of 1 + N).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from koret.config import RerankerConfig
from koret.data import detect_format, load_section, normalize_text, read_table, split_source
from koret.encode import default_device, quiet_transformers, resolve_model_path
from koret.errors import KoretError

_NEGATIVE = re.compile(r"^negative(?:_(\d+))?$")
LISTWISE = ("lambda", "listnet")


@dataclasses.dataclass
class RerankerData:
    dataset: Any  # datasets.Dataset shaped for the loss (see the module table)
    num_negatives: int
    rows: int  # queries (mnrl, listwise, margin_mse) or pairs (bce)
    source: str


def _mined_tuples(cfg: RerankerConfig) -> tuple[dict[str, list[Any]], int] | None:
    """anchor, positive, negative_1..N (and scores) from a mined file, or None for a pairs source."""
    d = cfg.data
    path, selection = split_source(d.train)
    fmt = detect_format(path, "data.train") if d.format == "auto" else d.format
    if selection is not None or fmt not in ("parquet", "jsonl", "json", "csv", "tsv", "hf_disk"):
        return None
    df = read_table(path, fmt, "data.train", d.split)
    negs = sorted((str(c) for c in df.columns if _NEGATIVE.match(str(c))),
                  key=lambda c: int(_NEGATIVE.match(c).group(1) or 0))
    if "anchor" not in df.columns or not negs:
        return None
    if "positive" not in df.columns:
        raise KoretError(f"data.train: {path}: column 'positive' not found; available columns: "
                         f"{', '.join(map(str, df.columns))}", "a mined file has anchor, positive, negative_1..N")
    if d.num_negatives is not None:
        if d.num_negatives > len(negs):
            raise KoretError(f"data.num_negatives ({d.num_negatives}) is more than the {len(negs)} negative columns "
                             f"of {path}", "mine with more filter.num_negatives")
        negs = negs[: d.num_negatives]
    if d.limit is not None:
        df = df.iloc[: d.limit]
    cols: dict[str, list[Any]] = {}
    for name in ["anchor", "positive", *negs]:
        values = df[name].tolist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise KoretError(f"data.train: {path}: row {bad[0]} column {name!r} is empty",
                             "every row needs the same number of negatives: mine with on_shortage drop")
        cols[name] = [normalize_text(v, d.normalize) for v in values]
    if "scores" in df.columns:
        cols["scores"] = [[float(x) for x in s][: 1 + len(negs)] for s in df["scores"].tolist()]
    return cols, len(negs)


def load_reranker_data(cfg: RerankerConfig) -> RerankerData:
    """Rows shaped for ``loss.name`` (see the module table)."""
    from datasets import Dataset

    d = cfg.data
    if not d.train:
        raise KoretError("data.train: required key is missing", "point it at runs/mine/train.parquet")
    name = cfg.loss.name
    mined = _mined_tuples(cfg)
    if mined is None:  # plain pairs through the data layer
        data = load_section(d, "train")
        cols: dict[str, list[Any]] = {"anchor": [data.queries[q] for q, _ in data.pairs],
                                      "positive": [data.corpus[p] for _, p in data.pairs]}
        n_neg = 0
    else:
        cols, n_neg = mined
    negs = [c for c in cols if _NEGATIVE.match(c)]
    if not cols["anchor"]:
        raise KoretError(f"data.train: {d.train}: no rows (empty dataset)")
    if name in ("lambda", "listnet", "margin_mse") and not negs:
        raise KoretError(f"loss.name {name}: needs hard negatives, and {d.train} has only (query, positive) pairs",
                         "mine first (koret mine), or use loss mnrl / cached_mnrl")
    if name in ("mnrl", "cached_mnrl"):
        rows = {k: cols[k] for k in ["anchor", "positive", *negs]}
    elif name == "bce":
        anchors, passages, labels = [], [], []
        for i, q in enumerate(cols["anchor"]):
            for j, col in enumerate(["positive", *negs]):
                anchors.append(q)
                passages.append(cols[col][i])
                labels.append(1.0 if j == 0 else 0.0)
        rows = {"anchor": anchors, "passage": passages, "label": labels}
    elif name in LISTWISE:
        rows = {"query": cols["anchor"],
                "docs": [[cols[c][i] for c in ["positive", *negs]] for i in range(len(cols["anchor"]))],
                "labels": [[1.0] + [0.0] * len(negs) for _ in cols["anchor"]]}
    else:  # margin_mse: the mined scores are the gold similarities
        if "scores" not in cols:
            raise KoretError(f"loss.name margin_mse: {d.train} has no 'scores' column (the teacher's scores of the "
                             "positive and each negative)", "use a train.parquet written by koret mine")
        short = [i for i, s in enumerate(cols["scores"]) if len(s) != 1 + len(negs)]
        if short:
            raise KoretError(f"loss.name margin_mse: row {short[0]} of {d.train} has {len(cols['scores'][short[0]])} "
                             f"scores for {1 + len(negs)} passages", "re-mine: every row needs a score per passage")
        rows = {k: cols[k] for k in ["anchor", "positive", *negs]}
        rows["label"] = cols["scores"]
    n_rows = len(next(iter(rows.values())))
    return RerankerData(Dataset.from_dict(rows), len(negs), n_rows, d.train)


def reranking_evaluator(cfg: RerankerConfig) -> Any:
    """sentence-transformers' CrossEncoderRerankingEvaluator over ``data.eval`` (a mined file of held-out
    queries): each query's positive and hard negatives are reordered and scored (NDCG@10, MRR@10, MAP); the
    evaluator's "base" figures are the teacher's order of the same passages (1.0 after positive-aware filtering,
    which keeps only negatives the teacher scores below the positive)."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    d = cfg.data
    path, _ = split_source(d.eval)
    fmt = detect_format(path, "data.eval")
    df = read_table(path, fmt, "data.eval", d.split)
    negs = [str(c) for c in df.columns if _NEGATIVE.match(str(c))]
    if "anchor" not in df.columns or "positive" not in df.columns or not negs:
        raise KoretError(f"data.eval: {path}: expected a mined file (anchor, positive, negative_1..N); columns: "
                         f"{', '.join(map(str, df.columns))}", "mine the held-out queries with koret mine")
    if d.eval_max_queries:
        df = df.iloc[: d.eval_max_queries]
    samples = []
    for _, row in df.iterrows():
        docs = [normalize_text(row[c], d.normalize) for c in ["positive", *negs] if isinstance(row[c], str)]
        scores = list(row["scores"])[: len(docs)] if "scores" in df.columns else None
        if scores is not None and len(scores) == len(docs):  # the mined (teacher) order is the "base" ranking
            docs = [doc for _, doc in sorted(zip(scores, docs, strict=True), key=lambda x: -x[0])]
        samples.append({"query": normalize_text(row["anchor"], d.normalize),
                        "positive": [normalize_text(row["positive"], d.normalize)], "documents": docs})
    return CrossEncoderRerankingEvaluator(samples, at_k=10, name="eval", write_csv=False)


def load_reranker(cfg: RerankerConfig) -> Any:
    """A CrossEncoder from a CrossEncoder folder / Hub id, or a plain encoder with a new one-logit head."""
    from sentence_transformers import CrossEncoder

    name = cfg.model.name
    if not name:
        raise KoretError("model.name: required key is missing", "a CrossEncoder (e.g. BAAI/bge-reranker-v2-m3) "
                                                                  "or an encoder Hub id / folder")
    ref = resolve_model_path(name, "model.name")
    quiet_transformers()
    try:
        model = CrossEncoder(ref, num_labels=1, max_length=cfg.model.max_length, device=default_device())
    except (OSError, ValueError) as exc:
        raise KoretError(f"model.name: could not load {name!r} as a cross-encoder "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if model.num_labels != 1:
        raise KoretError(f"model.name: {name!r} has {model.num_labels} output labels; a reranker has one",
                         "use a one-logit reranker, or a plain encoder (koret adds a one-logit head)")
    return model


def build_reranker_loss(cfg: RerankerConfig, model: Any, num_negatives: int) -> Any:
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
