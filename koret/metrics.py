"""Retrieval metrics with exactly trec_eval's definitions, as pure functions of a ranking and judgments.

For one query, ``ranked`` is the list of retrieved doc ids best first and ``qrels`` maps doc id -> grade
(grade >= 1 is relevant, as in trec_eval). At cut-off ``k``:

- ``ndcg@k``      trec_eval ``ndcg_cut_k``: DCG with gain = grade and discount log2(rank + 1), divided by the DCG of
  the ideal ordering of all judged grades, both cut at k;
- ``mrr@k``       trec_eval ``recip_rank`` on the run truncated to k: 1 / rank of the first relevant doc, else 0;
- ``map@k``       trec_eval ``map_cut_k``: sum of precision at each relevant retrieved rank <= k, divided by the
  number of relevant docs (all of them, not min(R, k));
- ``recall@k``    trec_eval ``recall_k``: relevant retrieved in the top k / relevant;
- ``precision@k`` trec_eval ``P_k``: relevant retrieved in the top k / k;
- ``accuracy@k``  trec_eval ``success_k`` (hit rate): 1 if any relevant doc is in the top k.

These are the numbers MTEB and the papers report (MTEB computes them with pytrec_eval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

METRICS = ("ndcg", "mrr", "map", "recall", "precision", "accuracy")


def query_metrics(ranked: Sequence[object], qrels: Mapping[object, int], ks: Sequence[int]) -> dict[str, float]:
    """All metrics at every k for one query (keys like ``ndcg@10``)."""
    relevant = {d: g for d, g in qrels.items() if g >= 1}
    n_rel = len(relevant)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = list(ranked[:k])
        gains = [relevant.get(d, 0) for d in top]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains) if g > 0)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        hits = [i for i, g in enumerate(gains) if g > 0]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        out[f"map@{k}"] = sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / n_rel if n_rel else 0.0
        out[f"recall@{k}"] = len(hits) / n_rel if n_rel else 0.0
        out[f"precision@{k}"] = len(hits) / k
        out[f"accuracy@{k}"] = 1.0 if hits else 0.0
    return out


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average every metric over queries (trec_eval's ``all`` line)."""
    if not per_query:
        return {}
    keys = per_query[0].keys()
    return {k: sum(q[k] for q in per_query) / len(per_query) for k in keys}


def first_relevant_rank(ranked: Sequence[object], qrels: Mapping[object, int]) -> int | None:
    """1-based rank of the first relevant doc in ``ranked``, or None."""
    for i, d in enumerate(ranked):
        if qrels.get(d, 0) >= 1:
            return i + 1
    return None
