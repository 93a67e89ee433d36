"""Korean lexical candidates (search.lexical): Kiwi tokens, BM25 scores by hand, the union and its sources."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import mine_config, run_cli, write_config

from koret.filter_rules import DENSE, LEXICAL
from koret.lexical import (
    LexicalSettings,
    bm25_scores,
    build_index,
    reference_top_k,
    tokenize,
    top_k,
    union_candidates,
)

pytest.importorskip("kiwipiepy")
pytest.importorskip("bm25s")

TEXTS = ["한빛대학교의 도서관은 1987년에 세워졌으며 열람실이 세 곳 있다.",
         "푸른강 다리는 Seoul Transit이 관리하는 철교로, 길이는 842미터이다.",
         "도서관 열람실에서 학생들이 시험 공부를 했다."]


def test_nfc_and_nfd_tokenize_alike_and_particles_are_dropped():
    nfc = tokenize(TEXTS)
    nfd = tokenize([unicodedata.normalize("NFD", t) for t in TEXTS])
    assert nfc == nfd
    assert "도서관" in nfc[0] and "1987" in nfc[0] and "은" not in nfc[0] and "에" not in nfc[0]
    assert "seoul" in nfc[1], "Latin lowercased"


def test_bm25_scores_equal_the_formula_by_hand(tmp_path):
    settings = LexicalSettings(k1=1.2, b=0.75)
    docs = tokenize(TEXTS)
    index, stats = build_index(TEXTS, settings, tmp_path / "cache")
    assert stats["cached"] is False
    query = tokenize(["도서관 열람실은 언제 세워졌나?"])[0]
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    expected = []
    for d in docs:
        s = 0.0
        for term in set(query):
            df = sum(term in x for x in docs)
            if df == 0:
                continue
            tf = d.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + settings.k1 * (1 - settings.b + settings.b * len(d) / avg))
        expected.append(s)
    assert bm25_scores(index, query) == pytest.approx(np.array(expected), rel=1e-5)
    assert expected[0] > expected[2] > expected[1] == 0.0
    again, stats = build_index(TEXTS, settings, tmp_path / "cache")
    assert stats["cached"] is True and np.array_equal(bm25_scores(again, query), bm25_scores(index, query))
    _, other = build_index(TEXTS, LexicalSettings(k1=1.5), tmp_path / "cache")
    assert other["cached"] is False, "k1 is part of the cache key"


def test_top_k_orders_ties_by_index_and_skips_zero_scores():
    scores = np.array([0.5, 2.0, 0.5, 0.0, 2.0, 0.5], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [1, 4, 0]
    assert top_k(scores, 10).tolist() == [1, 4, 0, 2, 5]


def test_union_scores_every_candidate_with_the_teacher_and_keeps_sources():
    teacher = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    dense_ids = np.array([[0, 1], [4, 3]])
    dense_scores = teacher[np.arange(2)[:, None], dense_ids]
    lexical_ids = np.array([[3, 1, -1], [0, -1, -1]])
    lexical_scores = np.where(lexical_ids >= 0, teacher[np.arange(2)[:, None], np.maximum(lexical_ids, 0)], -np.inf)

    ids, scores, sources = union_candidates(dense_ids, dense_scores, lexical_ids, lexical_scores)
    assert ids.tolist() == [[0, 1, 3], [4, 3, 0]]
    assert np.allclose(scores, [[0.9, 0.8, 0.6], [0.5, 0.4, 0.1]])
    assert sources.tolist() == [[DENSE, DENSE | LEXICAL, LEXICAL], [DENSE, DENSE, LEXICAL]]


def test_mine_with_lexical_candidates(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      search__lexical={"top_k": 10})
    path = write_config(tmp_path / "mine.yaml", cfg)
    result = run_cli("mine", "-c", str(path), "--quiet")
    assert result.exit_code == 0, result.stderr
    out = Path(cfg["output"]["dir"])
    cands = pd.read_parquet(out / "candidates.parquet")
    stats = json.loads((out / "stats.json").read_text())
    dense_k = cfg["search"]["top_k"]
    seen = {"dense": 0, "lexical": 0, "both": 0}
    for row in cands.itertuples():
        assert len(row.candidate_sources) == len(row.candidate_ids) <= dense_k + 10
        assert sum(s in ("dense", "both") for s in row.candidate_sources) == dense_k
        assert np.all(np.diff(row.teacher_candidate_scores) <= 0), "the union is ordered by teacher score"
        for s in row.candidate_sources:
            seen[s] += 1
    assert seen["lexical"] > 0 and seen["both"] > 0
    lex = stats["search"]["lexical"]
    assert lex["index"]["cached"] is False and lex["candidates_per_query"] > dense_k
    counts = stats["negative_sources"]
    assert sum(counts.values()) == stats["rows_out"] * cfg["filter"]["num_negatives"]
    # koret filter reads the sources back and counts the same
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    again = run_cli("filter", "-c", str(write_config(tmp_path / "f.yaml", resolved)),
                    "--set", f"output.dir={tmp_path}/f", "--set", f"filter.candidates={out}", "--quiet")
    assert again.exit_code == 0, again.stderr
    assert json.loads((tmp_path / "f" / "stats.json").read_text())["negative_sources"] == counts
    # a second mine reuses the cached index
    result = run_cli("mine", "-c", str(path), "--quiet", "--set", f"output.dir={tmp_path}/m2")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "m2" / "stats.json").read_text())["search"]["lexical"]["index"]["cached"] is True
    pd.testing.assert_frame_equal(pd.read_parquet(out / "train.parquet"), pd.read_parquet(tmp_path / "m2" /
                                                                                          "train.parquet"))


def test_irregular_verb_and_adjective_stems_are_kept():
    """Kiwi tags irregular stems VV-I / VA-I (돕 in 도와서, 아름답 in 아름다운): they count as VV / VA."""
    assert tokenize(["친구를 도와서 음악을 들었다.", "공원을 걸었다.", "아름다운 하늘", "누가 할머니를 도왔나?"]) == [
        ["친구", "돕", "음악", "듣"], ["공원", "걷"], ["아름답", "하늘"], ["할머니", "돕"]]


def test_an_index_cached_before_irregular_stems_were_kept_is_rebuilt(tmp_path, monkeypatch):
    import kiwipiepy

    import koret.lexical as lexical

    before = f"kiwi-{kiwipiepy.__version__}:{','.join(lexical.KIWI_CONTENT_TAGS)}:nfc"  # koret <= c1a614f
    monkeypatch.setattr(lexical, "_tokenizer_identity", lambda: before)
    _, old = build_index(TEXTS, LexicalSettings(), tmp_path)
    monkeypatch.undo()
    _, now = build_index(TEXTS, LexicalSettings(), tmp_path)
    assert old["cached"] is False and now["cached"] is False, "the tokenization changed: a new cache key"
    _, again = build_index(TEXTS, LexicalSettings(), tmp_path)
    assert again["cached"] is True


def _tie_corpus() -> tuple[list[str], list[str]]:
    """Synthetic passages with exact duplicates spread over the corpus (tie groups), and queries that match
    them, none, or repeat a term."""
    from koret.synth import generate

    syn = generate(40, seed=3, queries_per_entity=1)
    corpus = [p["positive"] for p in syn.pairs]
    for at in (3, 11, 17, 25, 33, 39):  # six copies of passage 0 (equal scores for every query) at these indices
        corpus.insert(at, corpus[0])
    queries = [p["query"] for p in syn.pairs] + ["", "zzz qqq", "축제 축제 체험", "매년 열리는 축제"]
    return corpus, queries


@pytest.mark.parametrize("k", [4, 7, 200])
def test_batched_search_equals_the_per_query_search_ties_included(k):
    from koret.lexical import bm25_top_k

    corpus, queries = _tie_corpus()
    index, _ = build_index(corpus, LexicalSettings(), None)
    toks = tokenize(queries)
    ref_ids, ref_scores = reference_top_k(index, toks, k)
    if k < len(corpus):
        full = [np.sort(bm25_scores(index, t))[::-1] for t in toks]
        assert any(f[k - 1] > 0 and f[k - 1] == f[k] for f in full), "a tie group straddles the cut"
    for threads in (1, 3):
        ids, scores = bm25_top_k(index, toks, k, n_threads=threads)
        assert ids.shape == (len(queries), min(k, len(corpus)))
        assert np.array_equal(ids, ref_ids), "the same passages in the same order, ties by index"
        assert np.array_equal(scores, ref_scores), "scores bit for bit"
    assert ids[len(queries) - 4].tolist() == [-1] * ids.shape[1], "an empty query finds nothing"
    assert ids[len(queries) - 3].tolist() == [-1] * ids.shape[1], "no term of the corpus"
    copies = [0, 3, 11, 17, 25, 33, 39]  # passage 0 and its six copies
    first = ids[0][np.isin(ids[0], copies)]
    assert first.tolist() == copies[: len(first)] and len(first) > 0, "a tie group in index order"


LEXICAL_WORKER = """
import json, sys
import numpy as np
from koret import dist
from koret.lexical import LexicalSettings, lexical_candidates

texts = json.loads(open(sys.argv[1], encoding="utf-8").read())
out = {}
for name, cache in (("cached", sys.argv[2]), ("sent", None)):
    ids, stats = lexical_candidates(texts["corpus"], texts["queries"], LexicalSettings(top_k=5), cache)
    out[name] = ids
    out[name + "_built_here"] = np.array([stats["index"] is not None])
    out[name + "_processes"] = np.array([stats["search_processes"]])
np.savez(sys.argv[3] + f"-{dist.rank()}.npz", **out)
"""


@pytest.mark.slow
def test_two_processes_split_the_queries_and_find_what_one_finds(tmp_path):
    """Each process searches half the queries against the main process's index (read from the cache, or sent
    when there is none); every process ends with all the candidates, equal to one process's."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    from koret.dist import _free_port
    from koret.lexical import lexical_candidates

    corpus, queries = _tie_corpus()
    (tmp_path / "texts.json").write_text(json.dumps({"corpus": corpus, "queries": queries}, ensure_ascii=False))
    (tmp_path / "worker.py").write_text(LEXICAL_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path / "texts.json"),
                           str(tmp_path / "cache"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, stats = lexical_candidates(corpus, queries, LexicalSettings(top_k=5), None)
    assert stats["search_processes"] == 1
    for rank in (0, 1):
        got = np.load(tmp_path / f"out-{rank}.npz")
        for name in ("cached", "sent"):
            assert np.array_equal(got[name], one), (rank, name)
            assert got[name + "_processes"].tolist() == [2]
            assert got[name + "_built_here"].tolist() == [rank == 0], "only the main process builds the index"
