"""Every input layout reads into the same RetrievalData; normalization and deduplication."""

from __future__ import annotations

import json
import unicodedata

import pandas as pd
import pytest

from koret.data import load_retrieval_data, normalize_text
from koret.errors import KoretError

ROWS = [
    {"question": "한글은 누가 만들었나?", "answer": "한글은 세종이 창제하였다.", "extra": 1},
    {"question": "한글은 누가 만들었나?", "answer": "훈민정음은 1446년에 반포되었다.", "extra": 2},
    {"question": "김치는 어떻게 보관하나?", "answer": "김치는 낮은 온도에서 보관한다.", "extra": 3},
]


def _check(data):
    assert data.queries == ["한글은 누가 만들었나?", "김치는 어떻게 보관하나?"]
    assert len(data.corpus) == 3
    assert data.pairs == [(0, 0), (0, 1), (1, 2)]
    assert data.qrels[0] == {0: 1, 1: 1}


def test_normalize_text_nfc_whitespace():
    nfd = unicodedata.normalize("NFD", "  한글\t은\n 좋다 ")
    assert nfd != "한글 은 좋다"
    assert normalize_text(nfd) == "한글 은 좋다"
    assert normalize_text(nfd, "none") == nfd


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "hf_disk"])
def test_pair_formats(tmp_path, fmt):
    df = pd.DataFrame(ROWS)
    path = tmp_path / (f"pairs.{fmt}" if fmt != "hf_disk" else "ds")
    if fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        from datasets import Dataset

        Dataset.from_pandas(df).save_to_disk(str(path))
    data = load_retrieval_data(str(path))  # auto-detected
    assert data.format == fmt
    _check(data)


def test_named_columns_and_missing_column(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame(ROWS)[["extra", "answer", "question"]].to_json(path, orient="records", lines=True,
                                                                force_ascii=False)
    _check(load_retrieval_data(str(path), query_column="question", positive_column="answer"))
    with pytest.raises(KoretError, match=r"column 'query' \(data.query_column\) not found; available columns: "
                                         r"extra, answer, question"):
        load_retrieval_data(str(path), query_column="query")


def test_squad_layout_and_article_ranges(tmp_path):
    doc = {"version": "1", "data": [
        {"title": "a", "paragraphs": [{"context": "세종은 한글을 만들었다.", "qas": [
            {"id": "1", "question": "한글은 누가?"}, {"id": "2", "question": "세종은 무엇을?"}]}]},
        {"title": "b", "paragraphs": [{"context": "김치는 발효 음식이다.", "qas": [
            {"id": "3", "question": "김치는 어떤 음식?"}]},
            {"context": "세종은  한글을 만들었다.", "qas": [{"id": "4", "question": "누가 한글을?"}]}]},
    ]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc, ensure_ascii=False))
    data = load_retrieval_data(str(path))
    assert data.format == "squad"
    assert len(data.corpus) == 2, "paragraphs identical after normalization are one passage"
    assert len(data.queries) == 4 and data.query_ids == ["1", "2", "3", "4"]
    assert data.qrels[3] == {0: 1}
    first = load_retrieval_data(f"{path}#0:1")
    rest = load_retrieval_data(f"{path}#1:")
    assert first.queries == ["한글은 누가?", "세종은 무엇을?"] and len(rest.queries) == 2
    with pytest.raises(KoretError, match="selects no article"):
        load_retrieval_data(f"{path}#5:")


def test_beir_layout_keeps_graded_relevance(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"_id": "d1", "title": "세종", "text": "한글을 만들었다."},
        {"_id": "d2", "title": "", "text": "김치는 발효 음식이다."},
        {"_id": "d3", "text": "장마는 6월에 시작한다."},
    ]))
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"_id": "q1", "text": "한글은 누가 만들었나"}, {"_id": "q2", "text": "김치란"}]))
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t1\n")
    data = load_retrieval_data(str(tmp_path), split="test")
    assert data.format == "beir"
    assert data.corpus[0] == "세종 한글을 만들었다."
    assert data.qrels[0] == {0: 2, 2: 1} and data.doc_ids == ["d1", "d2", "d3"]
    (tmp_path / "qrels" / "bad.tsv").write_text("q1\tdX\t1\nq9\td1\t1\nq1\td7\t1\n")
    with pytest.raises(KoretError, match=r"judgments that 2 name unknown doc ids \(e.g. 'dX', 'd7'\) "
                                         r"and 1 name unknown query ids \(e.g. 'q9'\)"):
        load_retrieval_data(str(tmp_path), split="bad")
    with pytest.raises(KoretError, match="available splits: bad, test"):
        load_retrieval_data(str(tmp_path), split="dev")


def test_autorag_layout_nested_retrieval_gt(tmp_path):
    pd.DataFrame({"doc_id": ["a", "b", "c"], "contents": ["세종은 한글을 만들었다.", "김치는 발효 음식이다.",
                                                          "훈민정음은 1446년에 반포되었다."]}).to_parquet(
        tmp_path / "corpus.parquet")
    pd.DataFrame({"qid": ["q1", "q2"], "query": ["한글은 누가?", "김치란?"],
                  "retrieval_gt": [[["a", "c"]], [["b"]]]}).to_parquet(tmp_path / "qa.parquet")
    for path in (tmp_path, tmp_path / "qa.parquet"):
        data = load_retrieval_data(str(path))
        assert data.format == "autorag"
        assert data.qrels == [{0: 1, 2: 1}, {1: 1}]


def test_extra_corpus_text_file_dedups_against_positives(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame(ROWS).to_json(path, orient="records", lines=True, force_ascii=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("한글은  세종이 창제하였다.\n새 문단이다.\n\n")
    data = load_retrieval_data(str(path), corpus=str(corpus))
    assert len(data.corpus) == 4 and data.corpus[-1] == "새 문단이다."


def test_normalize_none_keeps_variants_but_groups_them(tmp_path):
    nfc = "한글은 세종이 창제하였다."
    rows = [{"q": "누가?", "p": nfc}, {"q": "누가 만들었나?", "p": unicodedata.normalize("NFD", nfc)}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    data = load_retrieval_data(str(path), normalize="none")
    assert len(data.corpus) == 2 and data.groups == [0, 0]


@pytest.mark.parametrize("content,match", [
    ("", "empty dataset"),
    ('{"query": "한글", "positive": ""}\n', r"row 0 column 'positive': empty passage"),
    ('{"query": "  ", "positive": "세종"}\n', r"row 0 column 'query': empty query"),
    ('{"query": "한글", "positive": "세종"}\n{"query": broken\n', "unreadable or corrupt jsonl"),
])
def test_bad_jsonl(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(KoretError, match=match):
        load_retrieval_data(str(path))


def test_corrupt_parquet_and_missing_file(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(KoretError, match="unreadable or corrupt parquet"):
        load_retrieval_data(str(path))
    with pytest.raises(KoretError, match="file not found"):
        load_retrieval_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(KoretError, match="cannot tell the format"):
        (tmp_path / "x.bin").write_text("?")
        load_retrieval_data(str(tmp_path / "x.bin"))


def test_offline_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KoretError, match=r"Hub dataset 'nobody/no-such-korean-set'.*HF_HUB_OFFLINE"):
        load_retrieval_data("nobody/no-such-korean-set")


def test_squad_unanswerable_questions_are_never_positives(tmp_path):
    doc = {"version": "KLUE-MRC style", "data": [{"title": "a", "paragraphs": [
        {"context": "세종은 한글을 만들었다.", "qas": [
            {"id": "1", "question": "한글은 누가?", "is_impossible": False},
            {"id": "2", "question": "세종의 키는?", "is_impossible": True}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc, ensure_ascii=False))
    data = load_retrieval_data(str(path))
    assert data.query_ids == ["1"] and data.pairs == [(0, 0)]
    assert data.counts == {"unanswerable questions (is_impossible) skipped": 1}
    assert "1 unanswerable questions (is_impossible) skipped" in data.notes


def test_eval_keeps_ids_mining_merges_equal_texts(tmp_path):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "a", "text": "같은 문서"}\n{"_id": "b", "text": "같은  문서"}\n'
                                       '{"_id": "c", "text": "다른 문서"}\n', encoding="utf-8")
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "질문"}\n{"_id": "q2", "text": "질문"}\n',
                                        encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("q1\ta\t1\nq2\tb\t2\nq2\tc\t0\n")
    kept = load_retrieval_data(str(root), split="test", dedupe=False)
    assert kept.query_ids == ["q1", "q2"] and kept.doc_ids == ["a", "b", "c"]
    assert kept.qrels == [{0: 1}, {1: 2, 2: 0}]
    assert kept.groups == [0, 0, 2], "equal texts are still recognised as one passage"
    merged = load_retrieval_data(str(root), split="test")
    assert len(merged.queries) == 1 and len(merged.corpus) == 2
    only = merged.with_positives_only()
    assert only is merged
    zero = load_retrieval_data(str(root), split="test", dedupe=False)
    zero.qrels[0] = {0: 0}
    only = zero.with_positives_only()
    assert only.query_ids == ["q2"] and only.pairs == [(0, 1)]
    assert only.counts == {"queries without a positive skipped": 1}


# --------------------------------------------------------------------------------------------- no guessed id columns

TEXTS = {"question": ["한글은 누가 만들었나?", "김치는 어떻게 보관하나?"],
         "answer": ["한글은 세종이 창제하였다.", "김치는 낮은 온도에서 보관한다."]}


@pytest.mark.parametrize(("first", "values", "why"), [
    ("id", ["a", "b"], "is named like an id"),
    ("query_id", ["첫째", "둘째"], "is named like an id"),
    ("no", [1, 2], "holds ids"),
    ("key", ["doc-001", "doc-002"], "holds ids"),
])
def test_pairs_reader_refuses_a_guessed_id_column(tmp_path, first, values, why):
    """The first column is the default query column; when it holds ids the reader says so instead of training
    on (id, text) pairs, and reads the file once data.query_column / data.positive_column name the texts."""
    path = tmp_path / "p.jsonl"
    pd.DataFrame({first: values, **TEXTS}).to_json(path, orient="records", lines=True, force_ascii=False)
    with pytest.raises(KoretError) as err:
        load_retrieval_data(str(path))
    assert str(err.value).startswith(f"data.train: column {first!r} (column 1, the default query column) {why}")
    assert f"not query text; columns found: {first}, question, answer" in str(err.value)
    assert str(err.value).endswith("(set data.query_column to the column that holds the query text)")
    data = load_retrieval_data(str(path), query_column="question", positive_column="answer")
    assert data.queries == TEXTS["question"] and data.corpus == TEXTS["answer"] and data.pairs == [(0, 0), (1, 1)]


def test_pairs_reader_refuses_an_id_column_as_positive_and_reads_text_with_digits(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"question": TEXTS["question"], "passage_id": [17, 18], "answer": TEXTS["answer"]}).to_parquet(path)
    with pytest.raises(KoretError, match=r"column 'passage_id' \(column 2, the default positive passage column\) is "
                                         r"named like an id, not positive passage text; columns found: question, "
                                         r"passage_id, answer \(set data.positive_column"):
        load_retrieval_data(str(path))
    assert load_retrieval_data(str(path), positive_column="answer").corpus == TEXTS["answer"]
    # texts with digits are still texts: a number inside a sentence, a year
    years = tmp_path / "years.jsonl"
    pd.DataFrame({"q": ["1443", "세종 1443년?"], "p": ["훈민정음 1443년", "1446년 반포"]}).to_json(
        years, orient="records", lines=True, force_ascii=False)
    assert load_retrieval_data(str(years)).queries == ["1443", "세종 1443년?"]


def test_candidates_parquet_is_not_read_as_pairs(tmp_path):
    """koret mine's candidates.parquet (ids per query) is refused by every pairs reader (mine, train, eval),
    pointing at train.parquet, even when the query column is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "candidates.parquet"
    pq.write_table(pa.table({"query_id": ["q0", "q1"], "query": TEXTS["question"], "positive_ids": [[0], [1]],
                             "candidate_ids": [[1, 0], [0, 1]], "teacher_positive_scores": [[0.9], [0.8]],
                             "teacher_candidate_scores": [[0.5, 0.9], [0.4, 0.8]]}), path)
    for kwargs in ({}, {"query_column": "query", "positive_column": "query_id"}):
        with pytest.raises(KoretError, match=r"^data.train: .*candidates.parquet is koret mine's candidates.parquet "
                                             r"\(passage ids per query; columns: query_id, query, positive_ids, "
                                             r"candidate_ids, .*\(use the train.parquet beside it"):
            load_retrieval_data(str(path), **kwargs)


def test_cli_refuses_an_id_first_pairs_file_in_one_line(tmp_path, tiny_cross_encoder):
    """Through the CLI (koret train-reranker reads its pairs with the same reader): exit 2, one line."""
    from helpers import run_cli, write_config

    path = tmp_path / "p.csv"
    pd.DataFrame({"id": [1, 2], **TEXTS}).to_csv(path, index=False)
    cfg = write_config(tmp_path / "r.yaml", {"model": {"name": str(tiny_cross_encoder)}, "data": {"train": str(path)},
                                              "args": {"output_dir": str(tmp_path / "out"), "max_steps": 1,
                                                       "save_strategy": "no"}})
    r = run_cli("train-reranker", "-c", str(cfg), "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "column 'id' (column 1, the default query column) is named like an id" in r.stderr
    assert "set data.query_column" in r.stderr and not (tmp_path / "out").exists()


def test_extra_corpus_never_takes_a_column_of_ids(tmp_path):
    """An extra corpus file whose first column is ids is refused in one line (it was read as the passages: the ids
    became passages, or integer ids were dropped and the corpus silently stayed empty)."""
    import pandas as pd

    from koret.data import iter_passages

    for name, ids in (("doc_id", ["d001", "d002"]), ("pid", [1, 2])):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame({name: ids, "body": ["첫 번째 문단이다.", "두 번째 문단이다."]}).to_parquet(path)
        with pytest.raises(KoretError, match=rf"column '{name}' \(the first, taken when none is named\)"):
            iter_passages(str(path), "parquet")
        assert iter_passages(str(path), "parquet", "body") == ["첫 번째 문단이다.", "두 번째 문단이다."]


def test_data_sample_draws_seeded_rows_from_the_whole_source(tmp_path, data_dir):
    """data.sample: N rows drawn from the whole source (seeded, in source order), where data.limit takes the first
    N; a drawn query brings all its positives (never split into a row and a false negative); limit and sample
    together are refused, and so is a negative seed."""
    from koret.config import DataConfig, MineConfig
    from koret.data import load_section, row_selection

    full = load_section(DataConfig(train=str(data_dir / "pairs.jsonl")))
    n = len(full.pairs)
    assert full.pairs[0][0] == full.pairs[1][0], "the fixture's first query has two positives (rows 0 and 1)"
    cfg = DataConfig(train=str(data_dir / "pairs.jsonl"), sample=20, sample_seed=0)
    rows = row_selection(n, cfg)
    assert len(rows) == 20 and list(rows) == sorted(set(rows.tolist())) and rows.max() >= 20, rows
    assert (row_selection(n, cfg) == rows).all() and not (row_selection(n, cfg.model_copy(update={"sample_seed": 4}))
                                                          == rows).all()
    assert row_selection(n, DataConfig(limit=5)).tolist() == [0, 1, 2, 3, 4]
    assert (1 in rows) and (0 not in rows), "seed 0 draws one of the first query's two rows"
    sampled = load_section(cfg)
    got = [(sampled.queries[q], sampled.corpus[p]) for q, p in sampled.pairs]
    want = [(full.queries[q], full.corpus[p]) for q, p in full.pairs if q in {full.pairs[i][0] for i in rows}]
    assert got == want and len(got) == 21, "the 20 drawn rows and the first query's undrawn positive"
    assert sorted(sampled.qrels[sampled.queries.index(full.queries[0])]) == sorted(full.qrels[0])
    assert len(full.qrels[0]) == 2
    with pytest.raises(Exception, match="data.limit and data.sample are both set"):
        MineConfig.model_validate({"data": {"train": "x", "limit": 5, "sample": 5}})
    with pytest.raises(Exception, match="sample_seed"):
        MineConfig.model_validate({"data": {"train": "x", "sample": 5, "sample_seed": -1}})


def test_training_rows_come_from_the_sample(tmp_path, data_dir):
    """koret train on a mined train.parquet with data.sample reads exactly the drawn rows (scores included)."""
    import pandas as pd

    from koret.config import TrainConfig
    from koret.data import row_selection
    from koret.training.biencoder import load_train_data

    df = pd.DataFrame({"anchor": [f"질문 {i}" for i in range(50)], "positive": [f"정답 {i}" for i in range(50)],
                       "negative_1": [f"오답 {i}" for i in range(50)],
                       "scores": [[0.9, 0.1 * (i % 10)] for i in range(50)]})
    df.to_parquet(tmp_path / "train.parquet")
    cfg = TrainConfig.model_validate({"data": {"train": str(tmp_path / "train.parquet"), "sample": 8},
                                      "loss": {"name": "mnrl", "distill": {"name": "kl"}}})
    data = load_train_data(cfg)
    rows = row_selection(50, cfg.data)
    assert data.dataset["anchor"] == [f"질문 {i}" for i in rows]
    assert [s[1] for s in data.dataset["label"]] == pytest.approx([0.1 * (i % 10) for i in rows])


def test_reranker_rows_come_from_the_sample(tmp_path):
    """koret train-reranker on a mined train.parquet with data.sample reads exactly the drawn rows."""
    import pandas as pd

    from koret.config import RerankerConfig
    from koret.data import row_selection
    from koret.training.crossencoder import load_reranker_data

    df = pd.DataFrame({"anchor": [f"질문 {i}" for i in range(40)], "positive": [f"정답 {i}" for i in range(40)],
                       "negative_1": [f"오답 {i}" for i in range(40)], "scores": [[0.9, 0.01 * i] for i in range(40)]})
    df.to_parquet(tmp_path / "train.parquet")
    cfg = RerankerConfig.model_validate({"model": {"name": "x"}, "loss": {"name": "mnrl"},
                                         "data": {"train": str(tmp_path / "train.parquet"), "sample": 6,
                                                  "sample_seed": 2}})
    assert load_reranker_data(cfg).dataset["anchor"] == [f"질문 {i}" for i in row_selection(40, cfg.data)]
