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
