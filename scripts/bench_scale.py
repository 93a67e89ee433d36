"""Benchmark: search + filter at scale over synthetic normalized embeddings (no model), dim 384.

For 1M and 5M passages: peak RSS and seconds of koret's search (exact Flat, and an IVF index) followed by the
filter, each in its own process. A second query count at 1M shows that memory grows with the index, not with
queries x corpus (that matrix is never built). The corpus is written as .npy shards and memory-mapped, as
koret's embedding cache is.

    python scripts/bench_scale.py [--sizes 1000000,5000000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, run_side, save, synthetic_shards, table  # noqa: E402

DIM = 384
SHARD = 500_000

SIDE = """
def side(a):
    import numpy as np
    from koret.filter_rules import Candidates, FilterSettings, apply_filter
    from koret.report import set_quiet
    from koret.search import search
    set_quiet(True)
    blocks = [np.load(f, mmap_mode="r") for f in a["shards"]]
    n = sum(len(b) for b in blocks)
    rng = np.random.default_rng(1)
    pos = np.sort(rng.choice(n, size=a["queries"], replace=False))
    # queries: noisy copies of their positive, so the positive is near the top as with a real teacher
    from koret.encode import Embeddings
    q = Embeddings(blocks).take(pos) + rng.standard_normal((a["queries"], blocks[0].shape[1])).astype("float32") * 0.08
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t = time.perf_counter()
    res = search(q, blocks, 100, backend="faiss", index=a["index"], nprobe=a.get("nprobe"), train_sample=65536)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    pos_scores = np.einsum("ij,ij->i", q, Embeddings(blocks).take(pos))
    cands = Candidates([str(i) for i in range(len(q))], [""] * len(q), [np.array([p]) for p in pos],
                       [np.array([s], dtype=np.float32) for s in pos_scores], res.ids, res.scores)
    corpus = [""] * n
    out = apply_filter(cands, corpus, np.arange(n), FilterSettings(strategy="perc_pos", num_negatives=7, max_overlap=None))
    filter_s = time.perf_counter() - t
    recall = float(np.mean((res.ids == pos[:, None]).any(axis=1)))
    return {"search_s": search_s, "filter_s": filter_s, "rows_out": out.stats["rows_out"], "positive_found": recall}
"""


def shards(n: int) -> list[str]:
    return synthetic_shards(WORK / "scale" / f"{n}", n, DIM, SHARD, seed=n)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,5000000")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for n in sizes:
        files = shards(n)
        for index, nprobe in (("Flat", None), ("IVF1024,Flat", 32)):
            r = run_side(f"{index} {n}", SIDE, {"shards": files, "queries": args.queries, "index": index,
                                                "nprobe": nprobe})
            runs.append({"passages": n, "queries": args.queries, "index": index, **r})
            print(json.dumps(runs[-1]), flush=True)
    n = sizes[0]
    r = run_side("Flat more queries", SIDE, {"shards": shards(n), "queries": args.queries * 4, "index": "Flat"})
    runs.append({"passages": n, "queries": args.queries * 4, "index": "Flat", **r})
    print(json.dumps(runs[-1]), flush=True)

    flat = [r for r in runs if r["index"] == "Flat" and r["queries"] == args.queries]
    slope_mb = (flat[-1]["peak_rss_mb"] - flat[0]["peak_rss_mb"]) / (flat[-1]["passages"] - flat[0]["passages"])
    projection = {
        "bytes_per_passage_measured": slope_mb * 2**20,
        "rss_gb_at_100M_fp32_projected": (flat[0]["peak_rss_mb"] + slope_mb * (100_000_000 - flat[0]["passages"]))
        / 1024,
        "note": "projection from the measured RSS slope, for one process holding the whole corpus (fp32 Flat at "
                "100M x 384 is ~143 GiB of vectors, more than one H100/H200 holds); koret mine on N GPUs holds "
                "1/N of it per process: see the projection in docs/scale-out.md",
    }
    save("scale", {"dim": DIM, "runs": runs, "projection": projection})
    md = table(f"Search + filter at scale (synthetic dim-{DIM} embeddings, top-100, 7 negatives)",
               ["passages", "queries", "index", "search s", "filter s", "peak RSS MB", "positive in top-100"],
               [[r["passages"], r["queries"], r["index"], r["search_s"], r["filter_s"], r["peak_rss_mb"],
                 f"{r['positive_found']:.1%}"] for r in runs])
    md += (f"\nMeasured slope: {projection['bytes_per_passage_measured']:,.0f} bytes of RSS per passage "
           f"(the vectors are {DIM * 4} bytes). Projection (not measured): 100M passages need about "
           f"{projection['rss_gb_at_100M_fp32_projected']:,.0f} GiB in fp32; {projection['note']}.\n")
    print(md)
    (WORK / "scale.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
