"""Search over a corpus sharded across processes equals the single-process exact search, ties included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from koret.dist import _free_port, slice_of
from koret.encode import Embeddings
from koret.search import search
from koret.sharded_search import merge_slices

WORKER = """
import sys
import numpy as np
from pathlib import Path
from koret import dist
from koret.dist import _free_port
from koret.encode import Embeddings
from koret.dist import slice_of
from koret.sharded_search import pair_scores, search_slices

root, k, backend = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
index = {"ivf": "IVF2,Flat"}.get(backend, "Flat")  # an IVF index per slice, probing every cell: exact again
backend = "faiss" if backend == "ivf" else backend
files = sorted(root.glob("shard-*.npy"))
mine = slice_of(len(files), dist.rank(), dist.world_size())
shards = [np.load(files[i], mmap_mode="r") for i in mine]
start = sum(len(np.load(f, mmap_mode="r")) for f in files[: mine.start])
local = Embeddings(shards, start=start)
queries = np.load(root / "queries.npy")
n = sum(len(np.load(f, mmap_mode="r")) for f in files)
res = search_slices(queries, local, n, k, backend=backend, query_chunk_size=7, chunk=9, index=index, nprobe=2)
pairs = np.load(root / "pairs.npy")
scores = pair_scores(queries, local, pairs[:, 0], pairs[:, 1])
if dist.is_main():
    np.savez(root / f"out-{dist.world_size()}-{sys.argv[3]}.npz", ids=res.ids, scores=res.scores, pairs=scores)
"""


def _corpus(tmp: Path, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """7 shards of 10 rows on a coarse grid (many exact ties), tie groups across the slice boundaries."""
    corpus = np.round(rng.normal(size=(70, 8)) * 2) / 4
    corpus[[19, 20, 39, 40, 41]] = corpus[5]  # one vector in three slices, at both boundaries (3 processes)
    corpus[[34, 35]] = corpus[60]
    queries = np.round(rng.normal(size=(23, 8)) * 2) / 4
    queries[:4] = corpus[5]  # these queries rank the tie group first
    shards = [corpus[i:i + 10].astype(np.float32) for i in range(0, 70, 10)]
    for i, s in enumerate(shards):
        np.save(tmp / f"shard-{i}.npy", s)
    np.save(tmp / "queries.npy", queries.astype(np.float32))
    pairs = np.stack([rng.integers(0, 23, 50), rng.integers(-1, 70, 50)], axis=1)
    np.save(tmp / "pairs.npy", pairs)
    return shards, queries.astype(np.float32)


def test_merge_slices_orders_by_score_then_global_id():
    a = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[7, 3, -1]]))
    b = (np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[2, 12, 15]]))
    s, i = merge_slices([a, b], 4)
    assert i.tolist() == [[2, 7, 3, 12]] and np.allclose(s, [[0.9, 0.9, 0.5, 0.5]])


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_sharded_search_equals_one_process(tmp_path, processes):
    shards, queries = _corpus(tmp_path, np.random.default_rng(0))
    assert list(slice_of(7, 1, 3)) == [2, 3], "the tie group straddles both slice boundaries"
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    k = 6
    for backend in ("faiss", "torch", "ivf"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                               "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path), str(k), backend],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = np.load(tmp_path / f"out-{processes}-{backend}.npz")
        ref = search(queries, shards, k, backend="torch" if backend == "torch" else "faiss")
        if backend == "ivf":  # an approximate index per slice (every cell probed): the exact top-k scores, but
            # which members of a tie group at the k-th place it returns is the index's choice
            assert np.array_equal(got["scores"], ref.scores)
            for row in range(len(queries)):
                above = ref.scores[row] > ref.scores[row, -1]
                assert set(got["ids"][row][above]) == set(ref.ids[row][above])
            continue
        assert np.array_equal(got["ids"], ref.ids), "the same candidates in the same order"
        assert np.array_equal(got["scores"], ref.scores), "scores bit for bit"
        assert got["ids"][0, :k].tolist() == [5, 19, 20, 39, 40, 41], "ties by global passage index"
        pairs = np.load(tmp_path / "pairs.npy")
        from koret.search import exact_scores

        expected = exact_scores(queries, Embeddings(shards), pairs[:, 1], rows=pairs[:, 0])
        assert np.array_equal(got["pairs"], expected), "pair scores computed by each passage's owner"


WAITER = """
import time
from koret import dist
from koret.errors import KoretError

dist.barrier()
started = time.monotonic()
if dist.is_main():
    time.sleep(6)  # work the main process does alone (BM25 over a large corpus) while the others wait
try:
    dist.broadcast_from_main(1)
    print(dist.rank(), "ok", flush=True)
except KoretError as exc:
    print(dist.rank(), f"after {time.monotonic() - started:.0f} s:", exc, flush=True)
"""


def test_the_process_group_is_created_with_koret_s_six_hour_deadline(monkeypatch):
    """torch's default collective timeouts (gloo 30 min, NCCL 10 min) would end a long main-only phase: the
    process group gets koret's 6 hours (KORET_COLLECTIVE_TIMEOUT unset), or what the variable says."""
    from datetime import timedelta

    import accelerate

    from koret import dist

    seen = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kw: seen.append(kw) or object())
    monkeypatch.delenv("KORET_COLLECTIVE_TIMEOUT", raising=False)
    dist._state.cache_clear()
    try:
        dist._state()
        monkeypatch.setenv("KORET_COLLECTIVE_TIMEOUT", "90")
        dist._state.cache_clear()
        dist._state()
    finally:
        dist._state.cache_clear()
    assert [kw["timeout"] for kw in seen] == [timedelta(hours=6), timedelta(seconds=90)]


@pytest.mark.slow
@pytest.mark.parametrize("timeout", ["2"])
def test_collectives_wait_as_long_as_koret_collective_timeout_says(tmp_path, timeout):
    """Running out of KORET_COLLECTIVE_TIMEOUT is one line that names it (process 0 works alone for 6 s while
    process 1 waits 2 s at most)."""
    (tmp_path / "waiter.py").write_text(WAITER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KORET_COLLECTIVE_TIMEOUT": timeout}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(tmp_path / "waiter.py")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    out = proc.stdout
    line = next(x for x in out.splitlines() if x.startswith("1 "))
    assert line.startswith("1 after 2 s: waited 2 s in broadcast_object_list for the other processes of this run "
                           "and gave up"), out
    assert line.endswith("(raise KORET_COLLECTIVE_TIMEOUT (seconds) if a process needs longer alone)")
