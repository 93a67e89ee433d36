"""Benchmark: mining's search with the corpus sharded across processes (koret.sharded_search) vs one process.

Synthetic normalized embeddings written as .npy shards and memory-mapped, as koret's embedding cache is; 2,000
queries (noisy copies of corpus rows), top-100, exact FAISS Flat search. One process searches the whole corpus;
two gloo processes (torchrun) each search their slice and the main process merges. Reported per process: peak
RSS (VmHWM: ru_maxrss would include the launching parent's peak, kept across exec), and the peak before the
search (imports, torch as a mining run has it, the memory maps); wall time of the
search; agreement of the two runs' candidates (must be 100%).

    python scripts/bench_shard.py [--sizes 1000000:1024,5000000:384] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, WORK, save, synthetic_shards, table  # noqa: E402

SHARD = 250_000
K = 100

WORKER = """
import json, sys, time
import numpy as np
import torch  # noqa: F401  (a mining run has torch loaded for its teacher)
from koret import dist
from koret.encode import Embeddings
from koret.dist import slice_of
from koret.report import set_quiet
from koret.sharded_search import search_slices

from koret.report import peak_rss_bytes


def hwm_mb():
    return peak_rss_bytes() / 2**20


set_quiet(True)
files, queries, out = json.loads(sys.argv[1]), np.load(sys.argv[2]), sys.argv[3]
sizes = [np.load(f, mmap_mode="r").shape[0] for f in files]
mine = slice_of(len(files), dist.rank(), dist.world_size())
local = Embeddings([np.load(files[i], mmap_mode="r") for i in mine], start=sum(sizes[: mine.start]))
dist.barrier()
before = hwm_mb()
t = time.perf_counter()
res = search_slices(queries, local, sum(sizes), int(sys.argv[4]), backend="faiss")
wall = time.perf_counter() - t
peak = hwm_mb()
every = dist.gather_to_main({"rank": dist.rank(), "rss_before_mb": before, "peak_rss_mb": peak,
                             "slice_rows": len(local)})
if dist.is_main():
    np.save(out + ".ids.npy", res.ids)
    json.dump({"wall_s": wall, "processes": every}, open(out + ".json", "w"))
"""


def corpus(n: int, dim: int) -> tuple[list[str], str]:
    root = WORK / "shard" / f"{n}x{dim}"
    return synthetic_shards(root, n, dim, SHARD, seed=n + dim), str(root)


def queries(files: list[str], root: str, count: int) -> str:
    import numpy as np

    path = Path(root) / f"queries-{count}.npy"
    if not path.exists():
        rng = np.random.default_rng(7)
        first = np.load(files[0], mmap_mode="r")
        last = np.load(files[-1], mmap_mode="r")
        rows = np.concatenate([first[rng.choice(len(first), count // 2, replace=False)],
                               last[rng.choice(len(last), count - count // 2, replace=False)]])
        q = rows + rng.standard_normal(rows.shape).astype(np.float32) * 0.08
        np.save(path, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    return str(path)


def run(files: list[str], qpath: str, processes: int, out: str) -> dict:
    worker = WORK / "shard" / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
    if processes == 1:
        cmd = [sys.executable, str(worker)]
    else:
        from koret.dist import _free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(_free_port()), str(worker)]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    proc = subprocess.run([*cmd, json.dumps(files), qpath, out, str(K)], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes} processes failed: {proc.stderr[-3000:]}")
    return json.loads(Path(out + ".json").read_text())


def main() -> int:
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000:1024,5000000:384", help="passages:dim,...")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for spec in args.sizes.split(","):
        n, dim = (int(x) for x in spec.split(":"))
        files, root = corpus(n, dim)
        qpath = queries(files, root, args.queries)
        one = run(files, qpath, 1, f"{root}/one")
        two = run(files, qpath, 2, f"{root}/two")
        agree = float(np.mean(np.load(f"{root}/one.ids.npy") == np.load(f"{root}/two.ids.npy")))
        main_one, main_two = one["processes"][0], two["processes"][0]
        rows.append({"passages": n, "dim": dim, "queries": args.queries, "corpus_mb": n * dim * 4 / 2**20,
                     "one": one, "two": two, "agreement": agree,
                     "main_peak_ratio": main_two["peak_rss_mb"] / main_one["peak_rss_mb"],
                     "main_corpus_ratio": (main_two["peak_rss_mb"] - main_two["rss_before_mb"])
                     / (main_one["peak_rss_mb"] - main_one["rss_before_mb"])})
        print(json.dumps(rows[-1]), flush=True)
    save("shard", {"k": K, "shard_rows": SHARD, "runs": rows})
    md = table("Mining search with the corpus sharded over processes (synthetic embeddings, 2,000 queries, "
               "top-100, FAISS Flat; 2 = two gloo processes on this machine's 2 cores)",
               ["passages x dim", "corpus MB", "processes", "search s", "peak RSS MB per process",
                "main peak vs 1 process", "main corpus part vs 1 process", "same candidates"],
               [[f"{r['passages']:,} x {r['dim']}", r["corpus_mb"], p, r[k]["wall_s"],
                 " / ".join(f"{x['peak_rss_mb']:,.0f}" for x in r[k]["processes"]),
                 "" if p == 1 else f"{r['main_peak_ratio']:.2f}x", "" if p == 1 else f"{r['main_corpus_ratio']:.2f}x",
                 "" if p == 1 else f"{r['agreement']:.1%}"]
                for r in rows for p, k in ((1, "one"), (2, "two"))])
    print(md)
    (WORK / "shard.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
