"""Benchmark: BM25 candidates for mining (koret.lexical): the per-query loop koret had vs its batched search.

Synthetic Korean from koret.synth (fictional entities, no public text): --passages passages (one per entity) and
--queries questions about them, top-50, k1 1.5, b 0.75. The index is built once and cached under the bench folder
(Kiwi's tokenization of the passages is not timed) and the queries are tokenized once; timed is the search:

- reference: the loop ``koret mine`` ran before (kept here): one score vector per query from bm25s's
  ``get_scores_from_ids``, ``np.argpartition`` of the negated vector and a sort by (score, index), one thread;
- bm25s ``retrieve`` (numpy backend; numba and jax are not installed), all cores, on the first --retrieve-queries
  queries: its top-k keeps an arbitrary part of a tie group at the cut, so its ids are compared as sets of the
  passages scoring above the k-th score;
- ``koret.lexical.bm25_top_k`` with 1 thread and with every core.

The reference and bm25_top_k run --repeats times, interleaved, and the best time of each is reported.

Then ``lexical_candidates`` end to end (query tokenization included) in 1 and in 2 gloo processes (torchrun),
each process taking half of the queries. Every koret result is compared with the reference: ids and scores,
bit for bit.

    python scripts/bench_lexical.py [--passages 100000] [--queries 10000] [--retrieve-queries 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, WORK, save, table  # noqa: E402

K = 50

WORKER = """
import json, sys, time
import numpy as np
from koret import dist
from koret.lexical import LexicalSettings, lexical_candidates
from koret.report import set_quiet

set_quiet(True)
texts = json.loads(open(sys.argv[1], encoding="utf-8").read())
dist.barrier()
t = time.perf_counter()
ids, stats = lexical_candidates(texts["corpus"], texts["queries"], LexicalSettings(top_k=int(sys.argv[3])),
                                sys.argv[4])
wall = time.perf_counter() - t
if dist.is_main():
    np.save(sys.argv[2] + ".npy", ids)
    json.dump({"wall_s": wall, "threads": stats["search_threads"]}, open(sys.argv[2] + ".json", "w"))
"""


def texts(passages: int, queries: int) -> Path:
    """Synthetic passages and questions (deterministic), written once as JSON for the workers."""
    from koret.synth import generate

    path = WORK / "lexical" / f"texts-{passages}-{queries}.json"
    if not path.exists():
        syn = generate(passages, seed=11, queries_per_entity=1, paraphrase_rate=0.0)
        corpus = [p["positive"] for p in syn.pairs]
        import random

        asked = random.Random(5).sample(syn.pairs, queries)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"corpus": corpus, "queries": [p["query"] for p in asked]}, ensure_ascii=False))
    return path


def reference(index, query_tokens, k: int):
    """The per-query search koret ran before bm25_top_k (koret.lexical.reference_top_k)."""
    from koret.lexical import reference_top_k

    return reference_top_k(index, query_tokens, k)


def same_above_cut(ids, scores, ref_ids, ref_scores) -> bool:
    """bm25s retrieve vs the reference: the same scores, and the same passages above each query's k-th score."""
    import numpy as np

    if not np.array_equal(np.where(ref_ids >= 0, scores, 0), ref_scores):
        return False
    for row in range(len(ref_ids)):
        above = ref_scores[row] > ref_scores[row, -1]
        if set(ids[row][above]) != set(ref_ids[row][above]):
            return False
    return True


def processes(path: Path, cache: str, n: int, out: str) -> dict:
    worker = WORK / "lexical" / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(worker)]
    if n > 1:
        from koret.dist import _free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(_free_port()), str(worker)]
    proc = subprocess.run([*cmd, str(path), out, str(K), cache], capture_output=True, text=True, env=env,
                          timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{n} processes failed: {proc.stderr[-3000:]}")
    return json.loads(Path(out + ".json").read_text())


def main() -> int:
    import numpy as np

    from koret.lexical import LexicalSettings, _kiwi, _search_threads, bm25_top_k, build_index, tokenize
    from koret.report import set_quiet

    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--retrieve-queries", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the reference and of bm25_top_k (best kept)")
    args = parser.parse_args()
    set_quiet(True)
    path = texts(args.passages, args.queries)
    data = json.loads(path.read_text(encoding="utf-8"))
    cache = str(WORK / "lexical" / "cache")
    kiwi = _kiwi()
    t = time.perf_counter()
    index, stats = build_index(data["corpus"], LexicalSettings(), cache, kiwi)
    print(f"index: {time.perf_counter() - t:.1f} s (cached: {stats['cached']})", flush=True)
    t = time.perf_counter()
    query_tokens = tokenize(data["queries"], kiwi)
    tokenize_s = time.perf_counter() - t
    cores = _search_threads()

    runs = {"reference": lambda: reference(index, query_tokens, K)}
    runs.update({threads: lambda threads=threads: bm25_top_k(index, query_tokens, K, threads)
                 for threads in sorted({1, cores})})
    seconds = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    results = {}
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
        for name, fn in runs.items():
            t, c = time.perf_counter(), time.process_time()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    ref_ids, ref_scores = results["reference"]
    ref_s, ref_cpu = min(seconds["reference"]), min(cpu["reference"])
    print(f"reference loop: {ref_s:.1f} s", flush=True)
    sides = {}
    for threads in sorted({1, cores}):
        ids, scores = results[threads]
        sides[threads] = {"seconds": min(seconds[threads]), "all_seconds": seconds[threads],
                          "cpu_seconds": min(cpu[threads]),
                          "equal": bool(np.array_equal(ids, ref_ids) and np.array_equal(scores, ref_scores))}
        print(f"bm25_top_k, {threads} threads: {sides[threads]}", flush=True)
    sub = query_tokens[: args.retrieve_queries]
    t, c = time.perf_counter(), time.process_time()
    found = index.retrieve([list(q) for q in sub], k=K, show_progress=False, n_threads=cores,
                           backend_selection="numpy")
    retrieve_s, retrieve_cpu = time.perf_counter() - t, time.process_time() - c
    retrieve_same = same_above_cut(np.asarray(found.documents), np.asarray(found.scores, dtype=np.float32),
                                   ref_ids[: len(sub)], ref_scores[: len(sub)])
    ties_at_cut = int(sum((ref_scores[r] == ref_scores[r, -1]).sum() > 1 for r in range(len(sub))
                          if ref_scores[r, -1] > 0))
    print(f"bm25s retrieve, {len(sub)} queries: {retrieve_s:.1f} s, same above the cut: {retrieve_same}", flush=True)

    one = processes(path, cache, 1, str(WORK / "lexical" / "one"))
    two = processes(path, cache, 2, str(WORK / "lexical" / "two"))
    one_ids, two_ids = np.load(WORK / "lexical" / "one.npy"), np.load(WORK / "lexical" / "two.npy")
    split_equal = bool(np.array_equal(one_ids, ref_ids) and np.array_equal(two_ids, ref_ids))
    print(f"lexical_candidates: 1 process {one['wall_s']:.1f} s, 2 processes {two['wall_s']:.1f} s, "
          f"equal: {split_equal}", flush=True)

    n_q = len(query_tokens)
    per_q = ref_s / n_q
    save("lexical", {"passages": len(data["corpus"]), "queries": n_q, "k": K, "cores": cores,
                     "query_tokenize_s": tokenize_s, "reference_s": ref_s, "reference_all_s": seconds["reference"],
                     "reference_cpu_s": ref_cpu,
                     "bm25_top_k": sides,
                     "retrieve": {"queries": len(sub), "seconds": retrieve_s, "cpu_seconds": retrieve_cpu,
                                  "same_above_cut": retrieve_same,
                                  "queries_with_ties_at_cut": ties_at_cut},
                     "lexical_candidates": {"one": one, "two": two, "equal": split_equal}})
    rows = [["per-query loop (before; reference)", n_q, 1, ref_s, ref_cpu, "1.00x", "reference"]]
    rows += [["koret bm25_top_k", n_q, th, s["seconds"], s["cpu_seconds"], f"{ref_s / s['seconds']:.2f}x",
              "yes" if s["equal"] else "NO"] for th, s in sides.items()]
    rows.append([f"bm25s retrieve (numpy), first {len(sub):,} queries", len(sub), cores, retrieve_s, retrieve_cpu,
                 f"{per_q * len(sub) / retrieve_s:.2f}x",
                 ("same passages above the k-th score" if retrieve_same else "NO") +
                 f"; ties at the cut in {ties_at_cut} queries, resolved arbitrarily"])
    md = table(f"BM25 search for mining candidates ({len(data['corpus']):,} synthetic Korean passages, top-{K}; "
               f"best of {args.repeats} interleaved runs but bm25s's, which ran once; speed-up = the reference "
               "loop's wall seconds per query / the side's; CPU s = this process's CPU time, all threads; "
               "equal = ids and scores bit for bit)",
               ["search", "queries", "threads", "wall s", "CPU s", "speed-up", "equal to reference"], rows)
    md += "\n" + table(f"lexical_candidates end to end ({n_q:,} queries: Kiwi tokenization and search; index "
                       "from the cache)",
                       ["processes", "threads per process", "seconds (main process)", "speed-up", "equal"],
                       [[1, one["threads"], one["wall_s"], "1.00x", "yes" if split_equal else "NO"],
                        [2, two["threads"], two["wall_s"], f"{one['wall_s'] / two['wall_s']:.2f}x",
                         "yes" if split_equal else "NO"]])
    print(md)
    (WORK / "lexical.md").write_text(md)
    return 0 if split_equal and all(s["equal"] for s in sides.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
