"""Benchmark: koret mine vs sentence-transformers' mine_hard_negatives, same teacher, data and settings.

1. Mine at three sizes (synthetic Korean, N passages and N queries): wall time, peak RSS, agreement (share of
   input rows with identical negatives, a row both sides drop for shortage counting as agreeing).
   Library: mine_hard_negatives(use_faiss=True, relative_margin=0.05, sampling_strategy="top",
   output_format="n-tuple"). koret: perc_pos 0.95, exact FAISS search, top_k = the library's candidate window.
2. Margin sweep at the middle size: five filter settings. koret: one mine + four `koret filter`; library: five
   calls with cache_folder set (embeddings computed once, the fair comparison).

    python scripts/bench_mine.py [--sizes 2000,20000,100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, run_side, save, synthetic, table, teacher  # noqa: E402

N_NEG = 7
WINDOW = (N_NEG * 10 + 1) + 1  # the library's candidate window for single-positive data: range_max + max_positives

KORET = """
def side(a):
    from koret.config import MineConfig, validate
    from koret.filter import refilter
    from koret.mine import mine
    from koret.report import set_quiet
    set_quiet(True)
    cfg = validate(MineConfig, {
        "data": {"train": a["data"] + "/train.jsonl", "corpus": a["data"] + "/corpus.txt"},
        "teacher": {"model": a["model"], "batch_size": 64},
        "encode": {"shard_size": 20000},
        "search": {"backend": "faiss", "top_k": a["top_k"]},
        "filter": {"strategy": "perc_pos", "perc": 0.95, "num_negatives": a["n_neg"]},
        "output": {"dir": a["out"]}, "cache_dir": a["cache"]})
    stats = mine(cfg)
    sweep = []
    for i, s in enumerate(a.get("sweep", [])):
        t = time.perf_counter()
        c = cfg.model_copy(deep=True)
        c.filter.strategy, c.filter.perc, c.filter.margin = s["strategy"], s.get("perc", 0.95), s.get("margin", 0.05)
        c.filter.candidates = a["out"]
        c.output.dir = a["out"] + f"-sweep{i}"
        refilter(c)
        sweep.append(time.perf_counter() - t)
    return {"rows_out": stats["rows_out"], "sweep_s": sweep, "phases": stats["phases_seconds"]}
"""

LIBRARY = """
def side(a):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives
    import json as _json
    rows = [_json.loads(l) for l in open(a["data"] + "/train.jsonl", encoding="utf-8")]
    corpus = [l.rstrip("\\n") for l in open(a["data"] + "/corpus.txt", encoding="utf-8") if l.strip()]
    model = SentenceTransformer(a["model"], device="cpu")
    times = []
    for s in a.get("calls", [{"relative_margin": 0.05}]):
        t = time.perf_counter()
        ds = mine_hard_negatives(Dataset.from_list(rows), model, corpus=corpus, num_negatives=a["n_neg"],
                                 sampling_strategy="top", output_format="n-tuple", use_faiss=True, batch_size=64,
                                 verbose=False, cache_folder=a.get("cache"), **s)
        times.append(time.perf_counter() - t)
    ds.to_parquet(a["out"])
    return {"rows_out": len(ds), "calls_s": times}
"""


def agreement(data: Path, koret_out: Path, lib_out: Path) -> float:
    import pandas as pd

    rows = [json.loads(line) for line in open(data / "train.jsonl", encoding="utf-8")]
    negs = [f"negative_{i}" for i in range(1, N_NEG + 1)]
    ours = pd.read_parquet(koret_out / "train.parquet")
    theirs = pd.read_parquet(lib_out)
    om = {(r.anchor, r.positive): tuple(getattr(r, c) for c in negs) for r in ours.itertuples()}
    tm = {(r["query"], r["positive"]): tuple(r[c] for c in negs) for r in theirs.to_dict("records")}
    keys = {(r["query"], r["positive"]) for r in rows}
    return sum(om.get(k) == tm.get(k) for k in keys) / len(keys)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2000,20000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = str(teacher())
    results = []
    for n in sizes:
        data = synthetic(n)
        out = WORK / "mine" / str(n)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        k = run_side(f"koret {n}", KORET, {"data": str(data), "model": model, "top_k": WINDOW, "n_neg": N_NEG,
                                            "out": str(out / "koret"), "cache": str(out / "cache")})
        lib = run_side(f"library {n}", LIBRARY, {"data": str(data), "model": model, "n_neg": N_NEG,
                                                 "out": str(out / "library.parquet")})
        agree = agreement(data, out / "koret", out / "library.parquet")
        results.append({"size": n, "koret": k, "library": lib, "agreement": agree,
                        "time_ratio": k["wall_s"] / lib["wall_s"], "rss_ratio": k["peak_rss_mb"] / lib["peak_rss_mb"]})
        print(json.dumps(results[-1]), flush=True)

    # margin sweep at the middle size
    n = sizes[len(sizes) // 2]
    data = synthetic(n)
    out = WORK / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sweep = [{"strategy": "perc_pos", "perc": 0.93}, {"strategy": "perc_pos", "perc": 0.95},
             {"strategy": "perc_pos", "perc": 0.97}, {"strategy": "margin_pos", "margin": 0.05}]
    k = run_side("koret sweep", KORET.replace('"perc": 0.95, "num_negatives"', '"perc": 0.90, "num_negatives"'),
                 {"data": str(data), "model": model, "top_k": WINDOW, "n_neg": N_NEG, "out": str(out / "koret"),
                  "cache": str(out / "cache"), "sweep": sweep})
    calls = [{"relative_margin": 0.10}, {"relative_margin": 0.07}, {"relative_margin": 0.05},
             {"relative_margin": 0.03}, {"absolute_margin": 0.05}]
    lib = run_side("library sweep", LIBRARY, {"data": str(data), "model": model, "n_neg": N_NEG, "calls": calls,
                                              "out": str(out / "library.parquet"), "cache": str(out / "lib-cache")})
    sweep_result = {"size": n, "koret_s": k["wall_s"], "koret_filter_s": k["sweep_s"], "library_s": lib["wall_s"],
                    "library_calls_s": lib["calls_s"], "speedup": lib["wall_s"] / k["wall_s"]}
    print(json.dumps(sweep_result), flush=True)

    save("mine", {"teacher": "random lexical BERT, hidden 128, 2 layers (built locally)", "num_negatives": N_NEG,
                  "top_k": WINDOW, "sizes": results, "sweep": sweep_result})
    md = table("Mining: koret mine vs mine_hard_negatives (same teacher, data, settings; cold caches)",
               ["passages = queries", "koret s", "library s", "time ratio", "koret RSS MB", "library RSS MB",
                "RSS ratio", "agreement"],
               [[r["size"], r["koret"]["wall_s"], r["library"]["wall_s"], r["time_ratio"],
                 r["koret"]["peak_rss_mb"], r["library"]["peak_rss_mb"], r["rss_ratio"], f"{r['agreement']:.2%}"]
                for r in results])
    md += "\n" + table(f"Margin sweep, {n:,} passages: 5 filter settings",
                       ["", "total s", "per setting s"],
                       [["koret: mine + 4 x koret filter", sweep_result["koret_s"],
                         " / ".join(f"{t:.1f}" for t in [sweep_result["koret_s"] - sum(k["sweep_s"]),
                                                          *k["sweep_s"]])],
                        ["library: 5 calls with cache_folder", sweep_result["library_s"],
                         " / ".join(f"{t:.1f}" for t in lib["calls_s"])],
                        ["speed-up", f"{sweep_result['speedup']:.1f}x", ""]])
    print(md)
    (WORK / "mine.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
