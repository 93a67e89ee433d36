"""Search backends agree with brute force; sharding and chunking do not change results."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from koret.errors import KoretError
from koret.search import choose_backend, merge_topk, search


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return _unit(rng, 97, 16), _unit(rng, 1000, 16)


def _brute(q, c, k):
    s = q @ c.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_backends_equal_brute_force(vectors, backend):
    q, c = vectors
    blocks = [c[:300], c[300:310], c[310:]]  # uneven shards
    res = search(q, blocks, 25, backend=backend, query_chunk_size=13)
    bs, bi = _brute(q, c, 25)
    np.testing.assert_array_equal(res.ids, bi)
    np.testing.assert_allclose(res.scores, bs, atol=1e-5)
    assert res.backend == f"{backend}-cpu"


def test_k_larger_than_corpus_is_padded(vectors):
    q, c = vectors
    res = search(q[:3], [c[:5]], 8, backend="faiss")
    assert (res.ids[:, 5:] == -1).all() and np.isneginf(res.scores[:, 5:]).all()
    assert sorted(res.ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_ivf_index_finds_most_true_neighbours(vectors):
    q, c = vectors
    res = search(q, [c], 10, backend="faiss", index="IVF8,Flat", nprobe=4, train_sample=1000)
    _, bi = _brute(q, c, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, bi, strict=True)])
    assert recall > 0.6


def test_merge_topk_breaks_ties_by_lower_id():
    s, i = merge_topk(np.array([[0.5, 0.4]]), np.array([[7, 2]]), np.array([[0.5, 0.1]]), np.array([[3, 9]]), 3)
    assert i.tolist() == [[3, 7, 2]]


def test_backend_choices():
    assert choose_backend("auto", "Flat", 100) in ("faiss-cpu", "torch-cuda", "faiss-gpu")
    with pytest.raises(KoretError, match="search.index"):
        choose_backend("torch", "IVF16,Flat", 10)
    with pytest.raises(KoretError, match="index_factory"):
        search(np.ones((1, 4), np.float32), [np.ones((10, 4), np.float32)], 2, backend="faiss", index="Nope12")


def test_faiss_gpu_k_cap_falls_back(monkeypatch):
    import koret.search as s

    monkeypatch.setattr(s, "faiss_gpus", lambda: 2)
    monkeypatch.setattr(s, "torch_cuda", lambda: True)
    assert choose_backend("auto", "Flat", 100) == "faiss-gpu"
    assert choose_backend("auto", "Flat", 5000) == "torch-cuda"
    monkeypatch.setattr(s, "torch_cuda", lambda: False)
    assert choose_backend("faiss", "IVF16,Flat", 5000) == "faiss-cpu"


def test_corpus_visited_in_several_groups_gives_the_same_result(vectors, monkeypatch):
    import koret.search as s

    q, c = vectors
    real = s._groups
    monkeypatch.setattr(s, "_groups", lambda blocks: real(blocks, max_bytes=16 * 4 * 150))  # ~150 rows a group
    blocks = [c[i:i + 60] for i in range(0, len(c), 60)]
    assert len(s._groups(blocks)) > 5
    res = search(q, blocks, 25, backend="faiss", query_chunk_size=13)
    bs, bi = _brute(q, c, 25)
    np.testing.assert_array_equal(res.ids, bi)
    np.testing.assert_allclose(res.scores, bs, atol=1e-5)


# ------------------------------------------------------------------------------------ exact scores and ties


def _tied_corpus():
    """Vectors with entries in multiples of 1/8: every dot product is exact in fp32, fp16 and bf16, and many
    passages are exact duplicates, so ties straddle chunk, shard and top-k boundaries."""
    rng = np.random.default_rng(3)
    base = rng.integers(-8, 9, size=(40, 8)).astype(np.float32) / 8
    corpus = base[rng.integers(0, 40, size=300)]  # ~7 copies of each vector, scattered
    queries = base[rng.integers(0, 40, size=37)] + 0.0
    return queries, corpus


def _reference_topk(q, c, k):
    s = (q.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    order = np.lexsort((np.broadcast_to(np.arange(c.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("backend,precision", [("faiss", "float32"), ("torch", "float32"), ("torch", "float16"),
                                               ("torch", "bfloat16")])
@pytest.mark.parametrize("shards,chunk", [(1, 4096), (7, 5), (300, 1)])
def test_ties_give_the_same_topk_on_every_backend_layout_and_precision(backend, precision, shards, chunk):
    q, c = _tied_corpus()
    blocks = np.array_split(c, shards)
    res = search(q, blocks, 20, backend=backend, query_chunk_size=chunk, precision=precision)
    ref_s, ref_i = _reference_topk(q, c, 20)
    np.testing.assert_array_equal(res.ids, ref_i)  # ties broken by passage index
    np.testing.assert_array_equal(res.scores, ref_s)
    assert res.scores.dtype == np.float32


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_low_precision_selection_matches_float32_ranks_and_scores(vectors, precision):
    q, c = vectors  # unit vectors with crowded scores: fp16/bf16 alone would reorder many neighbours
    blocks = [c[:300], c[300:310], c[310:]]
    low = search(q, blocks, 25, backend="torch", query_chunk_size=13, precision=precision)
    full = search(q, blocks, 25, backend="torch", query_chunk_size=40, precision="float32")
    np.testing.assert_array_equal(low.ids, full.ids)
    np.testing.assert_array_equal(low.scores, full.scores)
    assert low.precision == precision and full.precision == "float32"


@pytest.mark.parametrize("backend,precision", [("faiss", "float32"), ("torch", "float32"), ("torch", "float16"),
                                               ("torch", "bfloat16")])
def test_float16_stored_shards_search_like_their_values_in_float32(vectors, backend, precision):
    """``encode.dtype: float16``: the search over half-precision shards is the exact search over the values
    they hold (ids and scores equal a float64 reference on the upcast values, ties by index)."""
    q, c = vectors
    half = c.astype(np.float16)
    res = search(q, [half[:300], half[300:310], half[310:]], 25, backend=backend, query_chunk_size=13,
                 precision=precision)
    ref_s, ref_i = _reference_topk(q, half.astype(np.float32), 25)
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_array_equal(res.scores, ref_s)


def test_scores_are_exact_float32_inner_products(vectors):
    from koret.search import exact_scores

    q, c = vectors
    res = search(q, [c[:500], c[500:]], 10, backend="faiss")
    want = np.einsum("qd,qkd->qk", q.astype(np.float64), c[res.ids].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(res.scores, want)
    from koret.encode import Embeddings

    np.testing.assert_array_equal(exact_scores(q, Embeddings([c[:3], c[3:]]), res.ids), want)


def test_near_ties_beyond_the_fetch_are_rechecked():
    # 60 identical passages tie for the first place, more than the candidates fetched in one go (k + 8):
    # which 10 are returned must still be the 10 lowest indices
    c = np.zeros((100, 4), np.float32)
    c[:, 1] = 1.0
    c[::2, 0] = 0.5  # even rows score 0.5 for the query, odd rows 0
    q = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    res = search(q, [c[i:i + 7] for i in range(0, 100, 7)], 10, backend="faiss")
    assert res.ids[0].tolist() == list(range(0, 20, 2))
    assert res.rechecked >= 1, "the 50-way tie at the k-th place is larger than the first fetch: a recheck ran"
    c[::2, 0] = np.linspace(0.9, 0.5, 50, dtype=np.float32)  # the same corpus without ties: nothing to recheck
    res = search(q, [c[i:i + 7] for i in range(0, 100, 7)], 10, backend="faiss")
    assert res.ids[0].tolist() == list(range(0, 20, 2)) and res.rechecked == 0


# ------------------------------------------------------------------------- GPU placement, precision flags, cost


class _FakeFaissGpus:
    """faiss with ``n`` fake GPUs: every GPU call is recorded and the index stays on the CPU (so the search runs)."""

    def __init__(self, monkeypatch, n: int) -> None:
        import types

        import faiss

        self.calls: list[tuple[str, object]] = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: self.calls.append(("StandardGpuResources", None))
                            or "resources", raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.to_all_gpus, raising=False)

    def to_gpu(self, resources, device, index):
        assert resources == "resources"
        self.calls.append(("index_cpu_to_gpu", device))
        return index

    def to_all_gpus(self, index, co=None, ngpu=-1):
        self.calls.append(("index_cpu_to_all_gpus", "shard" if co is not None and co.shard else "replicas"))
        return index


@pytest.mark.parametrize("world,local_rank,gpus,index,expected", [
    ("2", "1", 4, "Flat", [("StandardGpuResources", None), ("index_cpu_to_gpu", 1)]),
    ("16", "5", 8, "IVF4,Flat", [("StandardGpuResources", None), ("index_cpu_to_gpu", 5)]),  # 2 machines x 8
    ("3", "2", 2, "Flat", [("StandardGpuResources", None), ("index_cpu_to_gpu", 0)]),  # more processes than GPUs
    ("1", "0", 4, "Flat", [("index_cpu_to_all_gpus", "shard")]),  # one process: every GPU
    ("solo", "0", 4, "Flat", [("index_cpu_to_all_gpus", "shard")]),  # a single-process stage of a launched run
])
def test_faiss_gpu_index_of_a_launched_process_goes_to_its_own_gpu(vectors, monkeypatch, world, local_rank, gpus,
                                                                   index, expected):
    """Each process of a multi-process run puts its slice on GPU LOCAL_RANK (modulo the GPUs it sees), not on
    every GPU; a single process spreads the index over all of them."""
    from koret import dist

    q, c = vectors
    fake = _FakeFaissGpus(monkeypatch, gpus)
    monkeypatch.setenv("WORLD_SIZE", "2" if world == "solo" else world)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with dist.single_process() if world == "solo" else contextlib.nullcontext():
        res = search(q, [c[:400], c[400:]], 10, backend="faiss", index=index, nprobe=4, train_sample=1000)
    assert res.backend == "faiss-gpu"
    passes = len(fake.calls) // len(expected)
    assert passes >= 1 and fake.calls == expected * passes, fake.calls  # every selection pass places it alike
    if index == "Flat":
        np.testing.assert_array_equal(res.ids, _reference_topk(q, c, 10)[1])


def test_process_gpu_is_the_local_rank_in_a_multi_process_run_only(monkeypatch):
    from koret import dist
    from koret.search import process_gpu

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert [process_gpu(n) for n in (8, 4, 0)] == [6, 2, None]
    with dist.single_process():
        assert process_gpu(8) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_gpu(8) is None


def test_low_precision_selection_accumulates_in_float32_and_restores_the_flags(vectors, monkeypatch):
    """While torch selects candidates, neither fp16 nor bf16 matmuls may use reduced-precision reductions (the
    error bound assumes float32 accumulation); the caller's settings come back afterwards."""
    import torch

    matmul = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    before = {name: getattr(matmul, name) for name in names}  # torch's flags: monkeypatch cannot restore them
    seen: list[tuple[bool, bool]] = []
    real_topk = torch.topk

    def topk(*args, **kwargs):
        seen.append(tuple(getattr(matmul, name) for name in names))
        return real_topk(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", topk)
    q, c = vectors
    try:
        for name in names:
            setattr(matmul, name, True)
        res = search(q, [c], 10, backend="torch", precision="bfloat16")
        assert res.precision == "bfloat16" and seen and set(seen) == {(False, False)}
        assert all(getattr(matmul, name) for name in names)

        from koret.search import fp32_accumulation

        with pytest.raises(RuntimeError), fp32_accumulation():
            raise RuntimeError("a failure inside the search")
        assert all(getattr(matmul, name) for name in names)
    finally:
        for name, value in before.items():
            setattr(matmul, name, value)


class _RowCounting(np.ndarray):
    """A corpus block counting the rows read through slices of it (how the norm of a slice is read)."""

    rows_read = 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            _RowCounting.rows_read += len(range(start, stop, step))
        return super().__getitem__(key)


def test_the_norm_bound_reads_the_corpus_once_however_many_selection_passes(monkeypatch):
    # the near-tie case below needs several passes (k + 8, then 2x, 4x candidates): each used to read every row
    monkeypatch.setattr(_RowCounting, "rows_read", 0)
    c = np.zeros((100, 4), np.float32)
    c[:, 1] = 1.0
    c[::2, 0] = 0.5
    q = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    blocks = [c[i:i + 7].view(_RowCounting) for i in range(0, 100, 7)]
    res = search(q, blocks, 10, backend="faiss")
    assert res.ids[0].tolist() == list(range(0, 20, 2)) and res.rechecked >= 1
    assert _RowCounting.rows_read == 100


class _TakeCounting:
    """An Embeddings that records every gather."""

    def __init__(self, shards):
        from koret.encode import Embeddings

        self.emb = Embeddings(shards)
        self.takes: list[np.ndarray] = []

    def take(self, rows):
        self.takes.append(np.asarray(rows).copy())
        return self.emb.take(rows)


def test_exact_scores_of_a_long_pair_list_gather_in_few_bounded_steps_in_passage_order(monkeypatch):
    """A 1-D pair list (positives, lexical candidates) is scored in steps of EXACT_CHUNK_BYTES of float64 vectors,
    in passage order, not 64 pairs at a time in list order; the scores equal a float64 reference bit for bit and
    every way of stepping through the list."""
    import koret.search as s
    from koret.search import exact_scores

    rng = np.random.default_rng(5)
    c, q = _unit(rng, 3000, 16), _unit(rng, 200, 16)
    shards = [c[i:i + 250] for i in range(0, 3000, 250)]
    rows = rng.integers(0, 200, 5000)
    ids = rng.integers(0, 3000, 5000)
    ids[::9] = -1  # padding
    want = np.where(ids >= 0, np.einsum("pd,pd->p", q[rows].astype(np.float64),
                                        c[np.maximum(ids, 0)].astype(np.float64)).astype(np.float32), -np.inf)
    monkeypatch.setattr(s, "EXACT_CHUNK_BYTES", 8 * 16 * 500, raising=False)  # 500 pairs of 16 dims a step
    corpus = _TakeCounting(shards)
    got = exact_scores(q, corpus, ids, rows=rows)
    np.testing.assert_array_equal(got, want)
    valid = int((ids >= 0).sum())
    assert len(corpus.takes) == -(-valid // 500) and max(len(t) for t in corpus.takes) == 500
    gathered = np.concatenate(corpus.takes)
    assert np.array_equal(gathered, np.sort(ids[ids >= 0]))  # each valid pair once, in passage order
    for chunk in (1, 7, 64, 10_000):
        np.testing.assert_array_equal(exact_scores(q, corpus, ids, rows=rows, chunk=chunk), want)
    ids2 = np.where(rng.random((200, 25)) < 0.1, -1, rng.integers(0, 3000, (200, 25)))  # 2-D, as search rescores
    corpus.takes.clear()
    got2 = exact_scores(q, corpus, ids2)
    assert max(t.size for t in corpus.takes) * 16 * 8 <= 8 * 16 * 500  # rows of 25 pairs, at most 500 pairs
    ref = exact_scores(q, corpus, ids2.reshape(-1), rows=np.repeat(np.arange(200), 25)).reshape(200, 25)
    np.testing.assert_array_equal(got2, ref)
