"""MTEB(kor) in koret eval: configs/eval-mteb-ko.yaml agrees with the installed mteb's task metadata, and
``format: mteb`` reads each Hub layout of mteb's tasks exactly as mteb's own loaders read it (local folders in the
same layouts, read offline by datasets.load_dataset), scored equal to pytrec_eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

NINE = ["Ko-StrategyQA", "AutoRAGRetrieval", "MIRACLRetrieval", "PublicHealthQA", "BelebeleRetrieval",
        "MrTidyRetrieval", "MultiLongDocRetrieval", "LawIRKo", "SQuADKorV1Retrieval"]


def test_the_config_names_the_nine_tasks_as_the_installed_mteb_defines_them():
    import mteb

    cfg = yaml.safe_load((REPO / "configs" / "eval-mteb-ko.yaml").read_text(encoding="utf-8"))
    sets = {s["name"]: s for s in cfg["sets"]}
    assert list(sets) == NINE
    benchmark = mteb.get_benchmark("MTEB(kor, v2)")
    assert {t.metadata.name for t in benchmark.tasks if t.metadata.type == "Retrieval"} == set(NINE), \
        "the nine are MTEB(kor)'s retrieval tasks"
    for name, s in sets.items():
        meta = mteb.get_task(name).metadata
        assert s["format"] == "mteb" and s["normalize"] == "none", name
        assert (s["path"], s["revision"]) == (meta.dataset["path"], meta.dataset["revision"]), name
        assert s["split"] in meta.eval_splits, (name, meta.eval_splits)
        if meta.is_multilingual:
            assert s["subset"] in meta.hf_subsets, (name, s.get("subset"))
            assert all(lang.startswith("kor-") for lang in meta.eval_langs[s["subset"]]), "Korean on both sides"
        else:
            assert "subset" not in s and meta.hf_subsets == ["default"], name
            assert all(lang.startswith("kor-") for lang in meta.eval_langs), name
        assert meta.main_score == "ndcg_at_10", name
    r = run_cli("config", "validate", "-c", str(REPO / "configs" / "eval-mteb-ko.yaml"))
    assert r.exit_code == 0 and "valid eval config" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------- local Hub layouts


def write_hub_folder(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset folder laid out as a Hub repo: a parquet file per config and split, and README.md's ``configs:``
    header naming them (what datasets.load_dataset(folder, name=..., split=...) reads offline)."""
    import pandas as pd

    lines = ["---", "configs:"]
    for name, splits in configs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            pd.DataFrame(rows).to_parquet(root / name / f"{split}.parquet")
            lines += [f"  - split: {split}", f"    path: {name}/{split}.parquet"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]), encoding="utf-8")
    return root


def _retrieval_rows(pairs: list[dict[str, str]], id_key: str) -> tuple[list[dict], list[dict], list[dict]]:
    """corpus, queries and graded qrels rows with what published sets hold: titles on some passages, a passage
    text under two ids, a query text under two ids, grade-0 judgments, a query judged only 0, a query without
    judgments, padding the loader strips."""
    rows = pairs[:14]
    corpus = [{id_key: f"doc-{i:02d}", "title": f"제목 {i}" if i % 3 == 0 else "", "text": r["positive"] + " "}
              for i, r in enumerate(rows)]
    corpus += [{id_key: "doc-90", "title": "", "text": rows[4]["positive"] + " "},
               {id_key: "doc-91", "title": "", "text": "아무도 묻지 않는 문단이다."}]
    queries = [{id_key: f"q-{i:02d}", "text": r["query"]} for i, r in enumerate(rows)]
    queries += [{id_key: "q-90", "text": rows[2]["query"]}, {id_key: "q-99", "text": "판정이 없는 질문인가?"}]
    qrels = [{"query-id": f"q-{i:02d}", "corpus-id": f"doc-{i:02d}", "score": 1 + i % 2} for i in range(13)]
    qrels += [{"query-id": "q-00", "corpus-id": "doc-91", "score": 0},
              {"query-id": "q-90", "corpus-id": "doc-02", "score": 1},
              {"query-id": "q-13", "corpus-id": "doc-13", "score": 0}]
    return corpus, queries, qrels


@pytest.fixture(scope="module")
def hub_sets(tmp_path_factory, pairs):
    """Local folders in the layouts of the nine tasks' Hub datasets (datasets' cache kept in the temp folder)."""
    import datasets

    root = tmp_path_factory.mktemp("hub")
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / "datasets-cache"
    corpus, queries, qrels = _retrieval_rows(pairs, "_id")
    # a multilingual task (MIRACL, MLDR, Mr. TyDi): <subset>-corpus/-queries/-qrels; the corpus has one split only
    korean = write_hub_folder(root / "korean", {
        "korean-corpus": {"train": corpus}, "korean-queries": {"train": queries[:3], "test": queries},
        "korean-qrels": {"test": qrels},
        "english-corpus": {"train": corpus[:2]}, "english-queries": {"test": queries[:1]},
        "english-qrels": {"test": qrels[:1]}})
    # a one-language task (Ko-StrategyQA, AutoRAG, LawIRKo, SQuADKorV1): corpus / queries / default, ids in 'id'
    corpus, queries, qrels = _retrieval_rows(pairs[20:], "id")
    single = write_hub_folder(root / "single", {"corpus": {"corpus": corpus}, "queries": {"queries": queries},
                                                "default": {"dev": qrels, "train": qrels[:2]}})
    # PublicHealthQA: a config per language of (question, answer) rows; equal texts are one query / passage
    qa = [{"question": r["query"], "answer": r["positive"]} for r in pairs[40:50]]
    qa += [{"question": pairs[41]["query"], "answer": pairs[45]["positive"]},
           {"question": None, "answer": pairs[46]["positive"]}, {"question": "답이 없는 질문", "answer": None},
           {"question": "같은 답을 가진 다른 질문?", "answer": pairs[40]["positive"]}]
    public_health = write_hub_folder(root / "publichealth", {"korean": {"test": qa}, "english": {"test": qa[:2]}})
    # Belebele: a config per language; a passage per link (several questions each), subsets A-B = passages in A,
    # questions in B
    ko = [{"link": f"https://example.org/{i // 3}", "question_number": i % 3 + 1,
           "flores_passage": pairs[60 + i // 3]["positive"], "question": pairs[60 + i]["query"]} for i in range(12)]
    en = [{**r, "flores_passage": f"Passage number {i // 3} in English.", "question": f"English question {i}?"}
          for i, r in enumerate(ko)]
    belebele = write_hub_folder(root / "belebele", {"kor_Hang": {"test": ko}, "eng_Latn": {"test": en}})
    yield {"korean": korean, "single": single, "publichealth": public_health, "belebele": belebele}
    datasets.config.HF_DATASETS_CACHE = saved


def mteb_view(task_name: str, path: Path, subset: str, split: str):
    """What the installed mteb evaluates for one subset and split of a task whose dataset is ``path``: {passage
    id: text the model reads}, {query id: text} of the judged queries, {query id: {passage id: grade}}."""
    import mteb
    from mteb._create_dataloaders import _corpus_to_dict

    task = mteb.get_task(task_name, hf_subsets=[subset] if subset != "default" else None)
    task.metadata = task.metadata.model_copy(update={"dataset": {**task.metadata.dataset, "path": str(path)}})
    task.load_data()
    task.convert_v1_dataset_format_to_v2(num_proc=None)  # the older loaders' dicts, as mteb evaluates them
    block = task.dataset[subset][split]
    qrels = {q: dict(rel) for q, rel in block["relevant_docs"].items()}
    corpus = {row["id"]: _corpus_to_dict(row)["text"] for row in block["corpus"]}
    queries = {row["id"]: row["text"] for row in block["queries"] if row["id"] in qrels}
    return corpus, queries, qrels


def koret_view(path: Path, subset: str | None, split: str):
    from koret.data import load_retrieval_data

    data = load_retrieval_data(str(path), "mteb", subset=subset, split=split, normalize="none", dedupe=False,
                               key="data.path")
    qrels = {data.query_ids[q]: {data.doc_ids[d]: g for d, g in rel.items()} for q, rel in enumerate(data.qrels)}
    return dict(zip(data.doc_ids, data.corpus, strict=True)), dict(zip(data.query_ids, data.queries, strict=True)), qrels


@pytest.mark.parametrize("folder,task,subset,split", [
    ("korean", "MrTidyRetrieval", "korean", "test"),  # mteb's own loader for Mr. TyDi
    ("korean", "MIRACLRetrieval", "korean", "test"),  # the same layout through mteb's RetrievalDatasetLoader
    ("single", "Ko-StrategyQA", "default", "dev"),
    ("publichealth", "PublicHealthQA", "korean", "test"),
    ("belebele", "BelebeleRetrieval", "kor_Hang-kor_Hang", "test"),
    ("belebele", "BelebeleRetrieval", "eng_Latn-kor_Hang", "test"),  # passages of one config, questions of another
])
def test_format_mteb_reads_a_set_as_mteb_does(hub_sets, folder, task, subset, split):
    if task == "MIRACLRetrieval":  # MIRACL's metadata has no 'korean' subset; its loader is the generic one
        from mteb._create_dataloaders import _corpus_to_dict
        from mteb.abstasks.retrieval_dataset_loaders import RetrievalDatasetLoader

        block = RetrievalDatasetLoader(str(hub_sets[folder]), revision=None, split=split, config=subset).load()
        want_qrels = {q: dict(rel) for q, rel in block["relevant_docs"].items()}
        want = ({row["id"]: _corpus_to_dict(row)["text"] for row in block["corpus"]},
                {row["id"]: row["text"] for row in block["queries"]}, want_qrels)
    else:
        want = mteb_view(task, hub_sets[folder], subset, split)
    got = koret_view(hub_sets[folder], None if subset == "default" else subset, split)
    assert got[0] == want[0], "passages: ids and texts"
    assert got[1] == want[1], "judged queries: ids and texts"
    assert got[2] == want[2], "judgments"
    assert len(got[0]) >= 4 and len(got[1]) >= 4, "a comparison of real sets, not of empty ones"


def test_mteb_set_scored_equal_to_pytrec_eval(tmp_path, hub_sets, tiny_model):
    """koret eval on a set in mteb's layout: metrics equal pytrec_eval on mteb's own reading of the set (its
    qrels, its passage texts) over a run of every passage, ties included."""
    import numpy as np
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from koret.config import EncodeConfig
    from koret.encode import EncodeSettings
    from koret.evaluate import encode_unique
    from koret.prompts import resolve_prompts
    from koret.search import exact_scores

    ks = [1, 3, 5, 10]
    r = run_cli("eval", "--model", str(tiny_model), "--data", f"mrtidy-ko={hub_sets['korean']}", "--format", "mteb",
                "--set", "data.subset=korean", "--set", "data.normalize=none", "--k", "1,3,5,10",
                "--output", str(tmp_path / "eval"), "--set", f"cache_dir={tmp_path / 'cache'}", "--quiet")
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    corpus, queries, qrels = mteb_view("MrTidyRetrieval", hub_sets["korean"], "korean", "test")
    assert out["data"]["queries"] == len(queries) == 15 and out["data"]["passages"] == len(corpus) == 16
    assert out["data"]["format"] == "mteb" and out["data"]["queries_without_relevant"] == 1

    model = SentenceTransformer(str(tiny_model), device="cpu")
    qp, pp = resolve_prompts(model.prompts, None, "m")
    enc = EncodeSettings(model_name=str(tiny_model), shard_size=EncodeConfig().shard_size, cache_dir=None)
    doc_ids, qids = list(corpus), list(queries)
    c_emb, _ = encode_unique(model, [corpus[d] for d in doc_ids], pp, enc, "p")
    q_emb, _ = encode_unique(model, [queries[q] for q in qids], qp, enc, "q")
    scores = exact_scores(q_emb.to_array(), c_emb, np.tile(np.arange(len(doc_ids)), (len(qids), 1)))
    assert scores[0, doc_ids.index("doc-04")] == scores[0, doc_ids.index("doc-90")]  # an exact tie
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(doc_ids)} for i, q in enumerate(qids)}
    cut = ",".join(map(str, ks))
    ref = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cut}", f"recall.{cut}", f"P.{cut}",
                                                 f"map_cut.{cut}"}).evaluate(run)
    m = out["models"][0]["metrics"]
    for k in ks:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            want = sum(v[f"{theirs}_{k}"] for v in ref.values()) / len(ref)
            assert m[f"{ours}@{k}"] == pytest.approx(want, abs=1e-6), (ours, k)


def _expect(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = result.stderr.strip().splitlines()[-1]  # in-process, datasets' progress lines come first (the CLI hides them)
    assert "Traceback" not in result.stderr and line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)


def test_mteb_layout_errors_are_one_line_before_any_model_loads(tmp_path, hub_sets, monkeypatch):
    common = ["--model", str(tmp_path / "no-such-model"), "--format", "mteb", "--output", str(tmp_path / "e")]
    _expect(run_cli("eval", "--data", str(hub_sets["korean"]), "--set", "data.subset=ko", *common),
            "data.path: dataset folder", "no mteb layout for subset 'ko'", "korean-corpus")
    _expect(run_cli("eval", "--data", str(hub_sets["single"]), "--set", "data.split=test", *common),
            "config 'default' has no split 'test' (splits: dev, train)")
    _expect(run_cli("eval", "--data", str(hub_sets["publichealth"]), "--set", "data.subset=english",
                    "--set", "data.split=dev", *common), "could not load config 'english' split 'dev'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _expect(run_cli("eval", "--data", "nobody/no-such-korean-set", "--set", "data.subset=ko", *common),
            "data.path: Hub dataset 'nobody/no-such-korean-set'", "HF_HUB_OFFLINE is set")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text('{"query": "질문", "positive": "문단"}\n', encoding="utf-8")
    _expect(run_cli("eval", "--data", str(pairs_file), *common), f"data.path: file '{pairs_file}'", "not from one file")
    # a subset or revision on a set that is no Hub dataset would be ignored without a word: refused
    _expect(run_cli("eval", "--data", str(pairs_file), "--set", "data.revision=abc123", *common[:2],
                    "--output", str(tmp_path / "e")), "data.path: revision 'abc123' picks a Hub dataset's", "format jsonl")


def test_hub_format_reads_one_config_of_a_dataset(hub_sets):
    """format hub with data.subset: the rows of one config (here PublicHealthQA's Korean question/answer rows)."""
    from koret.data import load_retrieval_data

    data = load_retrieval_data(str(hub_sets["publichealth"]), "hub", subset="english", split="test",
                               query_column="question", positive_column="answer", key="data.path")
    korean = load_retrieval_data(str(hub_sets["publichealth"]), "mteb", subset="korean", split="test", key="data.path")
    assert len(data.pairs) == 2 and data.queries == korean.queries[:2], "the english config's two rows"
    assert data.corpus == korean.corpus[:len(data.corpus)] and data.format == "hub"


def test_subset_and_revision_reach_every_datasets_call(hub_sets, monkeypatch):
    """An eval set's revision and subset, as a config gives them, are what every datasets call is asked for (the
    pinned revision is what makes a set mteb's; local folders would read the same without it)."""
    import datasets

    from koret.config import EvalConfig, validate
    from koret.data import load_section

    seen: list[tuple[str, str | None, str | None]] = []
    for fn in ("load_dataset", "get_dataset_config_names", "get_dataset_split_names"):
        def recorded(path, *args, _fn=fn, _real=getattr(datasets, fn), **kw):
            seen.append((_fn, kw.pop("revision", None), kw.get("name") or kw.get("config_name")))
            return _real(path, *args, **kw)

        monkeypatch.setattr(datasets, fn, recorded)
    cfg = validate(EvalConfig, {"sets": [{"name": "mrtidy", "path": str(hub_sets["korean"]), "format": "mteb",
                                          "subset": "korean", "revision": "0123abcd", "normalize": "none"}]}, "test")
    data = load_section(cfg.sets[0], "path", dedupe=False)
    assert len(data.queries) == 15 and len(data.corpus) == 16
    assert {f for f, _, _ in seen} == {"load_dataset", "get_dataset_config_names", "get_dataset_split_names"}
    assert all(rev == "0123abcd" for _, rev, _ in seen), seen
    assert {c for f, _, c in seen if f == "load_dataset"} == {"korean-corpus", "korean-queries", "korean-qrels"}
