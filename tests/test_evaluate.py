"""koret eval: metrics equal pytrec_eval's, readers, two models with deltas, the cache, bad inputs, a suite of sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from koret.metrics import mean_metrics, query_metrics
from koret.significance import paired_comparison

KS = [1, 3, 5, 10, 20]


def test_metrics_equal_pytrec_eval_on_graded_qrels():
    import pytrec_eval

    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels, runs, ours = {}, {}, []
    for q in range(80):
        judged = rng.sample(docs, rng.randint(1, 12))
        grades = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        if not any(grades.values()):
            grades[judged[0]] = 1
        ranked = rng.sample(docs, rng.randint(5, 40))  # runs shorter than some k, too
        qid = f"q{q}"
        qrels[qid] = grades
        runs[qid] = {d: float(len(ranked) - i) for i, d in enumerate(ranked)}  # strictly decreasing: our order
        ours.append((qid, query_metrics(ranked, grades, KS)))
    cut = ",".join(map(str, KS))
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cut}", f"map_cut.{cut}", f"recall.{cut}",
                                                       f"P.{cut}", f"success.{cut}"})
    ref = evaluator.evaluate(runs)
    names = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P", "accuracy": "success"}
    for qid, m in ours:
        for k in KS:
            for ours_name, trec_name in names.items():
                assert m[f"{ours_name}@{k}"] == pytest.approx(ref[qid][f"{trec_name}_{k}"], abs=1e-6), (
                    qid, ours_name, k)
            truncated = {d: s for d, s in runs[qid].items() if s > len(runs[qid]) - k}
            rr = pytrec_eval.RelevanceEvaluator({qid: qrels[qid]}, {"recip_rank"}).evaluate({qid: truncated})
            assert m[f"mrr@{k}"] == pytest.approx(rr[qid]["recip_rank"], abs=1e-6)
    mean = mean_metrics([m for _, m in ours])
    assert mean["ndcg@10"] == pytest.approx(sum(ref[q]["ndcg_cut_10"] for q in ref) / len(ref), abs=1e-9)


def _write_beir(root: Path, pairs: list[dict[str, str]], *, width: int = 0, extra_passages: list[str] = (),
                extra_qrels: list[str] = ()) -> Path:
    """A BEIR folder of fixture pairs: ids doc<n> / qry<n> (zero-padded to ``width``), graded qrels (1 or 2 by
    the query id's length), ``extra_passages`` as x<n> documents and ``extra_qrels`` lines appended."""
    (root / "qrels").mkdir(parents=True)
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    lines = ["query-id\tcorpus-id\tscore"]
    for row in pairs:
        d = docs.setdefault(row["positive"], f"doc{len(docs):0{width}d}")
        q = queries.setdefault(row["query"], f"qry{len(queries):0{width}d}")
        lines.append(f"{q}\t{d}\t{1 + len(q) % 2}")
    for text in extra_passages:
        docs.setdefault(text, f"x{len(docs):03d}")
    lines += list(extra_qrels)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                                               for t, i in docs.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                                                for t, i in queries.items()))
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def beir(tmp_path, pairs) -> Path:
    """A BEIR folder from the fixture pairs, with graded qrels and one judged-non-relevant doc."""
    return _write_beir(tmp_path / "beir", pairs, extra_qrels=["qry0\tdoc5\t0"])


def _eval(tmp_path: Path, *args: str):
    return run_cli("eval", "--output", str(tmp_path / "eval"), "--quiet", *args)


def test_two_models_side_by_side_with_deltas_and_cache(tmp_path, tiny_model, beir):
    trained = tmp_path / "other"
    from sentence_transformers import SentenceTransformer

    other = SentenceTransformer(str(tiny_model), device="cpu")
    import torch

    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    other.save(str(trained))
    md = tmp_path / "table.md"
    result = _eval(tmp_path, "--model", str(tiny_model), "--model", str(trained), "--data", str(beir),
                   "--k", "1,10,50", "--markdown", str(md), "--set", f"cache_dir={tmp_path}/cache")
    assert result.exit_code == 0, result.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [m["name"] for m in out["models"]] == ["tiny-st", "other"]
    assert out["k"] == [1, 10, 50] and out["baseline"] == "tiny-st"
    assert set(out["models"][0]["metrics"]) >= {"ndcg@10", "mrr@10", "map@10", "recall@10", "precision@10",
                                                "accuracy@10", "recall@50", "ndcg@1"}
    assert out["data"]["fingerprint"] and out["models"][0]["passages_per_second"] > 0
    assert out["models"][0]["prompts"] == {"query": "query: ", "passage": "passage: "}, "the model's own prompts"
    a, b = (m["metrics"]["ndcg@10"] for m in out["models"])
    sig = out["models"][1]["significance"]["metrics"]["ndcg@10"]
    assert f"{b:.4f} ({b - a:+.4f} [{sig['ci_low']:+.4f}, {sig['ci_high']:+.4f}] p=" in md.read_text()
    assert "significance" not in out["models"][0], "the baseline is not compared with itself"

    lines = (tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()
    # the comparison is the paired one over these very queries: recompute it from the per-query rankings
    per_q = {label: [query_metrics([d for d, _ in json.loads(x)["models"][label]["top10"]],
                                   json.loads(x)["relevant"], [10])["ndcg@10"] for x in lines]
             for label in ("tiny-st", "other")}
    assert np.mean(per_q["tiny-st"]) == pytest.approx(a) and np.mean(per_q["other"]) == pytest.approx(b)
    assert sig == pytest.approx(paired_comparison(per_q["tiny-st"], per_q["other"]).as_dict())
    assert len(lines) == out["data"]["queries"]
    row = json.loads(lines[0])
    assert set(row["models"]) == {"tiny-st", "other"} and len(row["models"]["other"]["top10"]) == 10
    assert row["relevant"] and "doc5" not in row["relevant"], "grade 0 is not relevant"

    # second run: the passages of an unchanged model are not encoded again
    again = _eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--set", f"cache_dir={tmp_path}/cache")
    assert again.exit_code == 0, again.stderr
    enc = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"][0]["encode"]["passages"]
    assert enc["shards_computed"] == 0 and enc["shards_reused"] >= 1


def test_config_file_with_prompts_and_autorag(tmp_path, tiny_model):
    import pandas as pd
    from helpers import write_config

    root = tmp_path / "autorag"
    root.mkdir()
    pd.DataFrame({"doc_id": ["a", "b", "c", "d"], "contents": ["세종은 한글을 만들었다.", "김치는 발효 음식이다.",
                  "훈민정음은 1446년에 반포되었다.", "장마는 6월에 시작한다."]}).to_parquet(root / "corpus.parquet")
    pd.DataFrame({"qid": ["q1", "q2"], "query": ["한글은 누가 만들었나?", "김치는 어떤 음식인가?"],
                  "retrieval_gt": [[["a"], ["c"]], [["b"]]]}).to_parquet(root / "qa.parquet")
    cfg = {"data": {"path": str(root)}, "k": [1, 2, 10],
           "models": [{"name": str(tiny_model), "label": "base", "query_prompt": "query: ", "passage_prompt": ""}],
           "output": {"dir": str(tmp_path / "eval")}, "cache_dir": str(tmp_path / "cache")}
    result = run_cli("eval", "-c", str(write_config(tmp_path / "e.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "k 10 is larger than the corpus" in result.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["k"] == [1, 2, 4] and out["models"][0]["name"] == "base"
    assert out["models"][0]["prompts"] == {"query": "query: ", "passage": ""}
    first = json.loads((tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()[0])
    assert first["relevant"] == {"a": 1, "c": 1}


def _expect(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr
    for n in needles:
        assert n in last, (n, last)


def test_eval_bad_inputs(tmp_path, tiny_model, beir):
    (beir / "qrels" / "bad.tsv").write_text("qry0\tnope1\t1\nqry1\tnope2\t1\nqry999\tdoc1\t1\n")
    _expect(_eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--set", "data.split=bad"),
            "2 name unknown doc ids", "'nope1'", "1 name unknown query ids")

    (beir / "qrels" / "zero.tsv").write_text("qry0\tdoc1\t0\n")
    _expect(_eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--set", "data.split=zero"),
            "no query has a relevant passage")

    (beir / "qrels" / "some.tsv").write_text("qry0\tdoc1\t0\nqry1\tdoc1\t1\n")
    ok = _eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--set", "data.split=some",
               "--set", f"cache_dir={tmp_path}/c")
    assert ok.exit_code == 0 and "1 judged queries have no relevant passage: they count as 0" in ok.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["data"]["queries"] == 2 and out["data"]["queries_without_relevant"] == 1

    empty = tmp_path / "emptycorpus"
    (empty / "qrels").mkdir(parents=True)
    (empty / "corpus.jsonl").write_text("")
    (empty / "queries.jsonl").write_text('{"_id": "q", "text": "질문"}\n')
    (empty / "qrels" / "test.tsv").write_text("q\td\t1\n")
    _expect(_eval(tmp_path, "--model", str(tiny_model), "--data", str(empty)), "unknown doc ids")

    _expect(_eval(tmp_path, "--model", str(tmp_path / "missing"), "--data", str(beir)), "model folder not found")
    _expect(_eval(tmp_path, "--data", str(beir)), "no model to evaluate")


def test_mteb_offline_is_one_line(tmp_path, tiny_model, beir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--mteb", "Ko-StrategyQA")
    _expect(result, "--mteb needs")


def _beir_with_duplicates(root: Path, pairs) -> Path:
    """BEIR folder with what published sets contain: duplicate query texts under two ids, duplicate passage texts
    under two ids (exact score ties), graded qrels, grade-0 judgments and a query judged only 0."""
    (root / "qrels").mkdir(parents=True)
    rows = pairs[:24]
    docs = {f"d{i:02d}": r["positive"] for i, r in enumerate(rows)}
    # exact duplicates (and one NFD-decomposed copy) of relevant passages under other ids; some ids sort before,
    # some after the original, so trec_eval's reverse-id tie order matters
    import unicodedata

    docs["d90"] = docs["d03"]
    docs["a03"] = docs["d03"]
    docs["d91"] = unicodedata.normalize("NFD", docs["d05"])
    queries = {f"q{i:02d}": r["query"] for i, r in enumerate(rows)}
    queries["q90"] = queries["q03"]  # same text, its own id and judgments
    lines = ["query-id\tcorpus-id\tscore"]
    for i in range(len(rows)):
        lines.append(f"q{i:02d}\td{i:02d}\t{1 + i % 3}")
        lines.append(f"q{i:02d}\td{(i + 7) % len(rows):02d}\t0")
    lines += ["q03\td90\t1", "q90\ta03\t2", "q90\td03\t1", "q05\td91\t3", "q90\td11\t0"]
    lines = [ln for ln in lines if not ln.startswith("q07\t")] + ["q07\td02\t0", "q07\td90\t0"]  # only grade 0
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False)
                                               + "\n" for i, t in docs.items()), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                                                for i, t in queries.items()), encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_beir_set_is_scored_as_published_equal_to_pytrec_eval(tmp_path, tiny_model, pairs):
    """Every query and passage id is kept; metrics equal pytrec_eval on the set's own qrels over a run of every
    passage, ties included (trec_eval orders equal scores by document id, descending)."""
    import numpy as np
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from koret.config import EncodeConfig
    from koret.data import load_retrieval_data
    from koret.encode import EncodeSettings
    from koret.evaluate import encode_unique
    from koret.prompts import resolve_prompts
    from koret.search import exact_scores

    root = _beir_with_duplicates(tmp_path / "beir", pairs)
    ks = [1, 3, 5, 10]
    r = _eval(tmp_path, "--model", str(tiny_model), "--data", str(root), "--k", "1,3,5,10")
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["data"]["queries"] == 25 and out["data"]["passages"] == 27
    assert out["data"]["queries_without_relevant"] == 1
    per_query = [json.loads(x) for x in (tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()]
    assert sorted(p["query_id"] for p in per_query) == sorted([f"q{i:02d}" for i in range(24)] + ["q90"])

    # the reference: the same embeddings, every passage scored, pytrec_eval on the original qrels
    data = load_retrieval_data(str(root), "beir", split="test", dedupe=False)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    qp, pp = resolve_prompts(model.prompts, None, "m")
    enc = EncodeSettings(model_name=str(tiny_model), shard_size=EncodeConfig().shard_size, cache_dir=None)
    c_emb, _ = encode_unique(model, data.corpus, pp, enc, "p")
    q_emb, _ = encode_unique(model, data.queries, qp, enc, "q")
    all_ids = np.tile(np.arange(len(data.corpus)), (len(data.queries), 1))
    scores = exact_scores(q_emb.to_array(), c_emb, all_ids)
    assert scores[0, data.doc_ids.index("d03")] == scores[0, data.doc_ids.index("d90")]  # an exact tie
    run = {data.query_ids[q]: {data.doc_ids[d]: float(scores[q, d]) for d in range(len(data.corpus))}
           for q in range(len(data.queries))}
    qrels = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    cut = ",".join(map(str, ks))
    ref = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cut}", f"recall.{cut}", f"P.{cut}",
                                                 f"map_cut.{cut}"}).evaluate(run)
    assert len(ref) == 25
    m = out["models"][0]["metrics"]
    for k in ks:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            want = sum(v[f"{theirs}_{k}"] for v in ref.values()) / len(ref)
            assert m[f"{ours}@{k}"] == pytest.approx(want, abs=1e-6), (ours, k)


def test_reranked_eval_equals_pytrec_eval_on_the_reranked_run(tmp_path, tiny_model, tiny_cross_encoder, beir):
    """koret eval --reranker: the first model's top 10 reordered by a CrossEncoder; metrics equal pytrec_eval on
    that reranked run (ties by doc id descending), and the table gets a row per reranker."""
    import pytrec_eval

    r = _eval(tmp_path, "--model", str(tiny_model), "--data", str(beir), "--k", "1,3,5,10",
              "--reranker", str(tiny_cross_encoder), "--rerank-top-k", "10")
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    names = [m["name"] for m in out["models"]]
    assert len(names) == 2 and names[1] == f"{names[0]} + tiny-ce" and out["models"][1]["rerank_top_k"] == 10
    per_query = [json.loads(x) for x in (tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()]
    run = {p["query_id"]: {d: s for d, s in p["models"][names[1]]["top10"]} for p in per_query}
    retrieved = {p["query_id"]: {d for d, _ in p["models"][names[0]]["top10"]} for p in per_query}
    assert all(set(run[q]) == retrieved[q] for q in run), "the reranker reorders the retriever's top 10"
    qrels = {}
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,3,5,10", "recall.1,3,5,10", "P.1,3,5,10"}).evaluate(run)
    m = out["models"][1]["metrics"]
    for k in (1, 3, 5, 10):
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P")):
            want = sum(v[f"{theirs}_{k}"] for v in ref.values()) / len(ref)
            assert m[f"{ours}@{k}"] == pytest.approx(want, abs=1e-6), (ours, k)
    assert m["ndcg@10"] != out["models"][0]["metrics"]["ndcg@10"]


def _distinct_beir(root: Path, pairs: list[dict[str, str]], extra: list[str]) -> Path:
    """A BEIR folder of the fixture pairs (graded qrels) with extra passages, every text distinct: more than 100
    passages, so recall@100 is not clamped to the corpus."""
    from koret.synth import generate

    more = extra + [p["positive"] for p in generate(60, seed=8, paraphrase_rate=0.3).pairs]
    root = _write_beir(root, pairs, width=3, extra_passages=more)
    assert sum(1 for _ in open(root / "corpus.jsonl", encoding="utf-8")) > 100
    return root


def test_reranked_row_keeps_the_retrievers_tail_and_is_compared_with_it(tmp_path, tiny_model, tiny_cross_encoder,
                                                                        pairs, extra_corpus):
    """--rerank-top-k 20 with k up to 100: the reranked list is the reranked top 20 followed by the retriever's
    ranks 21..100, so its recall@100 is the retriever's; its deltas, CIs and p-values are against the retriever
    it reranks (here the second model), not the first model. Checked against pytrec_eval on runs built here
    from the models directly (retriever embeddings, cross-encoder scores), not from koret's output."""
    import pytrec_eval
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    beir = _distinct_beir(tmp_path / "beir", pairs, extra_corpus)
    other = SentenceTransformer(str(tiny_model), device="cpu")  # a different first model (the baseline)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other.save(str(tmp_path / "other"))
    # the fixture cross-encoder's logits (4-9) put its sigmoid scores within float32 steps of 1 (ties that batching
    # noise flips); a tenth of its head's weights keeps them apart
    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    with torch.no_grad():
        ce.model.classifier.weight.mul_(0.1)
        ce.model.classifier.bias.mul_(0.1)
    ce.save(str(tmp_path / "tiny-ce"))
    md = tmp_path / "table.md"
    r = _eval(tmp_path, "--model", str(tmp_path / "other"), "--model", str(tiny_model), "--data", str(beir),
              "--k", "10,100", "--reranker", str(tmp_path / "tiny-ce"), "--rerank-top-k", "20",
              "--set", "rerank_model=tiny-st", "--markdown", str(md), "--set", f"cache_dir={tmp_path}/cache")
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [m["name"] for m in out["models"]] == ["other", "tiny-st", "tiny-st + tiny-ce"]
    retr, rr = out["models"][1], out["models"][2]

    # independent runs: the retriever's exact scores over the whole corpus, the cross-encoder on its top 20
    corpus = [json.loads(x) for x in (beir / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(x) for x in (beir / "queries.jsonl").read_text().splitlines()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    st = SentenceTransformer(str(tiny_model), device="cpu")
    c_emb = st.encode([c["text"] for c in corpus], prompt="passage: ", convert_to_numpy=True).astype(np.float64)
    q_emb = st.encode([q["text"] for q in queries], prompt="query: ", convert_to_numpy=True).astype(np.float64)
    scores = q_emb @ c_emb.T
    orders = [sorted(range(len(corpus)), key=lambda i: (-row[i], [-ord(ch) for ch in corpus[i]["_id"]]))
              for row in scores]
    ce_scores = ce.predict([(q["text"], corpus[i]["text"]) for q, order in zip(queries, orders, strict=True)
                            for i in order[:20]]).reshape(len(queries), 20)
    assert np.all((ce_scores > 0) & (ce_scores < 1))  # sigmoid: 10 + score ranks the head above the tail
    retriever_run, reranked_run = {}, {}
    ambiguous = 0  # queries where float noise (~1e-7: koret and this test batch texts apart) could swap two
    # passages that matter: scores within 1e-6 of a passage of another grade, or at the top-20 cut
    for q, row, order, head_scores in zip(queries, scores, orders, ce_scores, strict=True):
        grade = [qrels[q["_id"]].get(corpus[i]["_id"], 0) for i in order]
        near = [j for j in range(101) if row[order[j]] - row[order[j + 1]] < 1e-6]
        by_ce = np.argsort(-head_scores)
        near_ce = [(a, b) for a, b in zip(by_ce[:-1], by_ce[1:], strict=True) if head_scores[a] - head_scores[b] < 1e-6]
        ambiguous += any(j == 19 or grade[j] != grade[j + 1] for j in near) or \
            any(grade[a] != grade[b] for a, b in near_ce)
        retriever_run[q["_id"]] = {corpus[i]["_id"]: float(row[i]) for i in order[:100]}
        reranked_run[q["_id"]] = {**{corpus[i]["_id"]: float(row[i]) for i in order[20:100]},
                                  **{corpus[i]["_id"]: 10.0 + float(s) for i, s in zip(order[:20], head_scores,
                                                                                       strict=True)}}
    measures = {"ndcg_cut.10", "recall.10,20,100", "P.10"}
    ref_retr = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(retriever_run)
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(reranked_run)

    def mean(ref: dict, name: str) -> float:
        return float(np.mean([v[name] for v in ref.values()]))

    assert mean(ref_retr, "recall_20") < mean(ref_retr, "recall_100") - 0.3, "many positives sit at ranks 21-100"
    tol = 1e-6 + ambiguous / len(queries)  # a metric of one query is within [0, 1]
    assert ambiguous <= 5, ambiguous
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"), ("recall@100", "recall_100"),
                         ("precision@10", "P_10")):
        assert retr["metrics"][ours] == pytest.approx(mean(ref_retr, theirs), abs=tol), ours
        assert rr["metrics"][ours] == pytest.approx(mean(ref_rr, theirs), abs=tol), ours
    assert rr["metrics"]["recall@100"] == retr["metrics"]["recall@100"]
    assert rr["metrics"]["ndcg@10"] != retr["metrics"]["ndcg@10"]

    # the reference: the retriever it reranks, named in metrics.json, the table and the markdown; the paired
    # comparison is the one of the per-query NDCG@10 of the two rows (recomputed from per_query.jsonl's top 10)
    assert rr["compared_with"] == "tiny-st" and retr["compared_with"] == "other"
    sig = rr["significance"]
    assert sig["baseline"] == "tiny-st"
    rows = [json.loads(x) for x in (tmp_path / "eval" / "per_query.jsonl").read_text().splitlines()]
    per_q = {label: [query_metrics([d for d, _ in row["models"][label]["top10"]], row["relevant"], [10])["ndcg@10"]
                     for row in rows] for label in ("other", "tiny-st", "tiny-st + tiny-ce")}
    assert np.mean(per_q["tiny-st + tiny-ce"]) == pytest.approx(rr["metrics"]["ndcg@10"], abs=1e-9)
    want = paired_comparison(per_q["tiny-st"], per_q["tiny-st + tiny-ce"]).as_dict()
    assert sig["metrics"]["ndcg@10"] == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(paired_comparison(per_q["other"], per_q["tiny-st + tiny-ce"]).as_dict())
    assert sig["metrics"]["recall@100"]["delta"] == 0 == sig["metrics"]["recall@100"]["ci_low"] \
        == sig["metrics"]["recall@100"]["ci_high"]
    text = md.read_text()
    a, b = retr["metrics"]["ndcg@10"], rr["metrics"]["ndcg@10"]
    assert f"| tiny-st + tiny-ce (vs tiny-st) | {b:.4f} ({b - a:+.4f} [{want['ci_low']:+.4f}, " in text
    assert "Deltas against other (tiny-st + tiny-ce against tiny-st, the retrieval it reranks) over " in text


# --------------------------------------------------------------------------------------------- a suite of sets


def _small_beir(root: Path, pairs: list[dict[str, str]]) -> Path:
    """A BEIR folder of a few fixture pairs, graded qrels."""
    return _write_beir(root, pairs, width=3)


def _perturbed(tiny_model: Path, dest: Path, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer

    other = SentenceTransformer(str(tiny_model), device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other.save(str(dest))
    return dest


def _ndcg10_per_query(path: Path, label: str) -> list[float]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [query_metrics([d for d, _ in r["models"][label]["top10"]], r["relevant"], [10])["ndcg@10"] for r in rows]


def test_suite_of_sets_equals_single_set_runs_and_averages_them(tmp_path, tiny_model, tiny_cross_encoder, pairs):
    """koret eval --data A=... --data b --model M1 --model M2 (and a reranker): each set's record equals a
    single-set run's, the average is their mean, and every delta (per set, and on the average) has its interval
    and p-value; the average's are the macro comparison of the per-query scores of both sets."""
    import csv

    from koret.push import _evaluation_section
    from koret.significance import macro_paired_comparison
    from koret.stages import _eval_figure

    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs[:24]), encoding="utf-8")
    b = _small_beir(tmp_path / "b", pairs[30:60])
    m2 = _perturbed(tiny_model, tmp_path / "m2")
    common = ["--model", str(tiny_model), "--model", str(m2), "--reranker", str(tiny_cross_encoder),
              "--rerank-top-k", "10", "--k", "1,5,10", "--set", f"cache_dir={tmp_path}/cache", "--quiet"]
    md = tmp_path / "suite.md"
    suite = run_cli("eval", "--data", f"A={a}", "--data", str(b), "--output", str(tmp_path / "suite"),
                    "--markdown", str(md), *common)
    assert suite.exit_code == 0, suite.stderr
    single = {}
    for name, data in (("A", f"A={a}"), ("b", str(b))):
        r = run_cli("eval", "--data", data, "--output", str(tmp_path / name), *common)
        assert r.exit_code == 0, r.stderr
        single[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert "sets" not in single[name] and "average" not in single[name], "one set: today's layout"
    out = json.loads((tmp_path / "suite" / "metrics.json").read_text())
    labels = ["tiny-st", "m2", "tiny-st + tiny-ce"]
    assert list(out["sets"]) == ["A", "b"] and out["average"]["sets"] == ["A", "b"]

    for name in ("A", "b"):  # each set: exactly the single-set run
        got, want = out["sets"][name], single[name]
        assert [m["name"] for m in got["models"]] == labels == [m["name"] for m in want["models"]]
        assert got["k"] == want["k"] and got["data"]["fingerprint"] == want["data"]["fingerprint"]
        for g, w in zip(got["models"], want["models"], strict=True):
            assert g["metrics"] == pytest.approx(w["metrics"], abs=1e-9, rel=0)
            assert g.get("compared_with") == w.get("compared_with")
        for i in (1, 2):
            sig, want_sig = (x["models"][i]["significance"]["metrics"] for x in (got, want))
            assert set(sig) == set(want_sig) >= {"ndcg@10", "recall@10"}
            for k, s in sig.items():
                assert s == pytest.approx(want_sig[k], abs=1e-9, rel=0), (name, i, k)
                assert 0 <= s["p_value"] <= 1 and s["ci_low"] <= s["delta"] <= s["ci_high"]

    # the macro average: top-level models (what readers of a single set's record read) are each set's mean
    assert [m["name"] for m in out["models"]] == labels and out["baseline"] == "tiny-st"
    assert out["k"] == [1, 5, 10] and out["data"]["queries"] == sum(s["data"]["queries"] for s in single.values())
    for i, row in enumerate(out["models"]):
        for k, v in row["metrics"].items():
            assert v == pytest.approx((single["A"]["models"][i]["metrics"][k] + single["b"]["models"][i]["metrics"][k])
                                      / 2, abs=1e-9, rel=0), (row["name"], k)
    assert out["models"][2]["compared_with"] == "tiny-st" and out["models"][2]["reranks"] == "tiny-st"
    for row in out["models"][1:]:
        sig = row["significance"]
        assert sig["baseline"] == "tiny-st" and "within each of the 2 sets" in sig["interval"]
        for k, s in sig["metrics"].items():
            assert s["delta"] == pytest.approx(row["metrics"][k] - out["models"][0]["metrics"][k], abs=1e-9)
            assert s["ci_low"] <= s["delta"] <= s["ci_high"] and 0 <= s["p_value"] <= 1
            assert s["queries"] == out["data"]["queries"]
    # ... whose interval and p-value are the macro comparison of both sets' per-query NDCG@10
    base = [_ndcg10_per_query(tmp_path / n / "per_query.jsonl", "tiny-st") for n in ("A", "b")]
    other = [_ndcg10_per_query(tmp_path / n / "per_query.jsonl", "m2") for n in ("A", "b")]
    want = macro_paired_comparison(base, other).as_dict()
    assert out["models"][1]["significance"]["metrics"]["ndcg@10"] == pytest.approx(want, abs=1e-9)

    rows = [json.loads(x) for x in (tmp_path / "suite" / "per_query.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["A"] * single["A"]["data"]["queries"] + ["b"] * single["b"]["data"]["queries"]
    with open(tmp_path / "suite" / "metrics.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert {r["set"] for r in table} == {"A", "b", "average"}
    cell = next(r for r in table if (r["set"], r["model"], r["metric"]) == ("average", "m2", "ndcg@10"))
    avg_sig = out["models"][1]["significance"]["metrics"]["ndcg@10"]
    assert float(cell["value"]) == out["models"][1]["metrics"]["ndcg@10"] and cell["compared_with"] == "tiny-st"
    assert float(cell["ci_low"]) == avg_sig["ci_low"] and float(cell["p_value"]) == avg_sig["p_value"]
    with open(tmp_path / "A" / "metrics.csv", newline="", encoding="utf-8") as fh:
        assert {r["set"] for r in csv.DictReader(fh)} == {"A"}, "--data NAME=PATH names a single set too"
    text = md.read_text()
    assert text.index("## A") < text.index("## b") < text.index("## average")

    # the readers of a single set's record: the run summary's figure and the model card
    figure, values = _eval_figure(None, out)
    assert figure.startswith("NDCG@10 ") and figure.endswith("(average of 2 sets)")
    card = "\n".join(_evaluation_section(out, out["models"][0], out["models"][1], False))
    assert card.index("### A") < card.index("### b") < card.index("### average") and "tiny-st + tiny-ce" not in card


def test_suite_errors_come_before_any_model_loads(tmp_path, pairs):
    from helpers import write_config

    missing = ["--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "eval"), "--quiet"]
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "s.jsonl").write_text(json.dumps(pairs[0], ensure_ascii=False) + "\n", encoding="utf-8")
    _expect(run_cli("eval", "--data", str(tmp_path / "x" / "s.jsonl"), "--data", str(tmp_path / "y" / "s.jsonl"),
                    *missing), "two sets are named 's'")
    _expect(run_cli("eval", "--data", f"average={tmp_path / 'x' / 's.jsonl'}", "--data", str(tmp_path / "y" / "s.jsonl"),
                    *missing), "'average' is the macro average's")
    zero = _small_beir(tmp_path / "zero", pairs[:3])
    (zero / "qrels" / "test.tsv").write_text("qry000\tdoc000\t0\n")
    _expect(run_cli("eval", "--data", f"ok={tmp_path / 'x' / 's.jsonl'}", "--data", f"z={zero}", *missing),
            "set z: ", "no query has a relevant passage")
    cfg = {"data": {"path": str(zero)}, "sets": [{"path": str(zero)}], "models": [{"name": "m"}]}
    _expect(run_cli("eval", "-c", str(write_config(tmp_path / "both.yaml", cfg))), "data.path and sets are both set")
    _expect(run_cli("eval", "--data", "A=", *missing), "no path after A=")
    # data's other keys beside a config's sets would be ignored without a word: refused
    cfg = {"data": {"max_queries": 3}, "sets": [{"path": str(zero)}], "models": [{"name": "m"}]}
    _expect(run_cli("eval", "-c", str(write_config(tmp_path / "mq.yaml", cfg))),
            "data.max_queries and sets are both set")
    # k 5 clamps to 1 on a one-passage set and to 3 on a three-passage one: no cut-off both have, no average
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs[:3]), encoding="utf-8")
    _expect(run_cli("eval", "--data", f"one={tmp_path / 'x' / 's.jsonl'}", "--data", f"three={three}", "--k", "5",
                    *missing), "no cut-off k is shared by every set")


def test_data_option_name_equals_path(tmp_path, monkeypatch):
    from koret.cli import named_path

    assert named_path("ko=data/eval.jsonl") == ("ko", "data/eval.jsonl")
    assert named_path("data/eval.jsonl") == (None, "data/eval.jsonl")
    assert named_path("runs/x=1/eval.jsonl") == (None, "runs/x=1/eval.jsonl"), "a separator before = : a path"
    monkeypatch.chdir(tmp_path)
    Path("a=b.jsonl").write_text("")
    assert named_path("a=b.jsonl") == (None, "a=b.jsonl"), "an existing path is a path"
    assert named_path("a=c.jsonl") == ("a", "c.jsonl")
    assert named_path("org/set") == (None, "org/set")


def test_data_flags_reach_every_set_of_a_suite(tmp_path, monkeypatch):
    """Several --data: data's other keys (from the config or --set) apply to each set; one --data does not keep
    the config's set name; --format reaches a config's sets."""
    from helpers import write_config

    import koret.evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg: seen.append(cfg))
    assert run_cli("eval", "--data", "a=x.jsonl", "--data", "b=y.jsonl", "--set", "data.max_queries=2",
                   "--model", "m").exit_code == 0
    assert [(s.name, s.path, s.max_queries) for s in seen[-1].sets] == [("a", "x.jsonl", 2), ("b", "y.jsonl", 2)]
    cfg = write_config(tmp_path / "e.yaml", {"data": {"path": "old.jsonl", "name": "klue"}, "models": [{"name": "m"}]})
    assert run_cli("eval", "-c", str(cfg), "--data", "new.jsonl").exit_code == 0
    assert seen[-1].data.path == "new.jsonl" and seen[-1].data.name is None
    suite = write_config(tmp_path / "s.yaml", {"sets": [{"path": "p.jsonl"}, {"path": "q.jsonl"}],
                                              "models": [{"name": "m"}]})
    assert run_cli("eval", "-c", str(suite), "--format", "jsonl").exit_code == 0
    assert [s.format for s in seen[-1].sets] == ["jsonl", "jsonl"]
