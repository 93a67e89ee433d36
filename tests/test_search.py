"""Search backends agree with brute force; sharding and chunking do not change results."""

from __future__ import annotations

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
    assert res.rechecked >= 0
