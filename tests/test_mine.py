"""End-to-end mine and filter: outputs, agreement with sentence-transformers, resume, NFC/NFD, rescoring."""

from __future__ import annotations

import json
import os
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import mine_config, run_cli, run_subprocess, write_config


def _mine(tmp: Path, tiny_model: Path, data_dir: Path, name: str = "mine.yaml", **overrides) -> Path:
    cfg = mine_config(tmp, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      **overrides)
    path = write_config(tmp / name, cfg)
    result = run_cli("mine", "-c", str(path), "--quiet")
    assert result.exit_code == 0, result.stderr
    return Path(cfg["output"]["dir"])


def test_mine_writes_every_output(tmp_path, tiny_model, data_dir, pairs):
    out = _mine(tmp_path, tiny_model, data_dir)
    for name in ("candidates.parquet", "corpus.parquet", "train.parquet", "stats.json", "scores.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"

    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "scores"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == len({(r["query"], r["positive"]) for r in pairs})
    assert stats["rows_out"] == len(train) > 0
    assert stats["rows_out"] + stats["shortage"]["dropped_rows"] == stats["rows_in"]
    assert set(stats["phases_seconds"]) >= {"read", "encode", "search", "filter", "write"}
    assert stats["encode"]["passages"]["texts_per_second"] > 0

    corpus = pd.read_parquet(out / "corpus.parquet")
    cands = pd.read_parquet(out / "candidates.parquet")
    positives_of = {}
    for row in cands.itertuples():
        positives_of[row.query] = {corpus.text[i] for i in row.positive_ids}
        assert len(row.candidate_ids) == 30
        assert np.all(np.diff(row.teacher_candidate_scores) <= 1e-6), "candidates sorted by score"
    for row in train.itertuples():
        negs = [row.negative_1, row.negative_2, row.negative_3]
        assert row.positive in positives_of[row.anchor]
        assert not set(negs) & positives_of[row.anchor], "a known positive was used as a negative"
        assert len(set(negs)) == 3
        # perc_pos 0.95: every negative scores at most 95% of the positive
        pos, *neg = row.scores
        assert all(n <= pos * 0.95 + 1e-6 for n in neg)
        assert neg == sorted(neg, reverse=True)

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["filter"]["perc"] == 0.95 and resolved["search"]["index"] == "Flat"


def test_filter_resamples_without_a_model(tmp_path, tiny_model, data_dir):
    out = _mine(tmp_path, tiny_model, data_dir)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["teacher"]["model"] = str(tmp_path / "no-such-model")  # filter must not load it
    path = write_config(tmp_path / "f.yaml", cfg)
    started = time.perf_counter()
    result = run_cli("filter", "-c", str(path), "--set", "filter.perc=0.80", "--set", f"output.dir={tmp_path}/f80",
                     "--set", f"filter.candidates={out}", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert time.perf_counter() - started < 20
    strict = json.loads((tmp_path / "f80" / "stats.json").read_text())
    loose = json.loads((out / "stats.json").read_text())
    assert strict["filtered"]["perc_pos"] > loose["filtered"]["perc_pos"]
    train = pd.read_parquet(tmp_path / "f80" / "train.parquet")
    for scores in train.scores:
        assert all(n <= scores[0] * 0.80 + 1e-6 for n in scores[1:])
    # re-filtering with the mine's own settings reproduces its train.parquet exactly
    result = run_cli("filter", "-c", str(path), "--set", f"output.dir={tmp_path}/same",
                     "--set", f"filter.candidates={out}/candidates.parquet", "--quiet")
    assert result.exit_code == 0, result.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "train.parquet"),
                                  pd.read_parquet(tmp_path / "same" / "train.parquet"))


def test_agreement_with_sentence_transformers(tmp_path, tiny_model, pairs, monkeypatch):
    """koret's perc_pos 0.95 == mine_hard_negatives(relative_margin=0.05, sampling top, n-tuple, exact search)."""
    import faiss
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from koret.data import normalize_text
    from koret.synth import generate

    rows = [{"query": normalize_text(r["query"]), "positive": normalize_text(r["positive"])} for r in pairs]
    rows += [{"query": p["query"], "positive": p["positive"]} for p in generate(150, seed=11).pairs]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_neg = 3
    max_pos = max(pd.DataFrame(rows).groupby("query").size())
    # koret searches as deep as the library does: its candidate window is range_max (n_neg * 10 + max_pos) plus
    # max_pos (+ 1 since sentence-transformers 6.3, a slot for a query that is a passage too); read it off the
    # library's index search. A row whose third valid negative sits at the window's edge is kept by one and
    # dropped by the other when the windows differ (4 of 426 rows with a window one short).
    searched: list[int] = []

    class RecordingIndex(faiss.IndexFlatIP):
        def search(self, x, k, *args, **kwargs):
            searched.append(k)
            return super().search(x, k, *args, **kwargs)

    monkeypatch.setattr(faiss, "IndexFlatIP", RecordingIndex)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    lib = mine_hard_negatives(
        Dataset.from_list(rows), model, relative_margin=0.05, num_negatives=n_neg, sampling_strategy="top",
        output_format="n-tuple", use_faiss=True, query_prompt_name="query", corpus_prompt_name="passage",
        batch_size=16, verbose=False,
    )
    window = searched[0]
    assert set(searched) == {window} and window >= (n_neg * 10 + max_pos) + max_pos, searched
    cfg = mine_config(tmp_path, tiny_model, tmp_path / "pairs.jsonl", search__top_k=window,
                      filter__num_negatives=n_neg)
    result = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    ours = pd.read_parquet(tmp_path / "out" / "train.parquet")

    negs = [f"negative_{i}" for i in range(1, n_neg + 1)]
    theirs_map = {(r["query"], r["positive"]): tuple(r[c] for c in negs) for r in lib}
    ours_map = {(r.anchor, r.positive): tuple(getattr(r, c) for c in negs) for r in ours.itertuples()}
    keys = {(r["query"], r["positive"]) for r in rows}  # a row both drop for shortage agrees too
    same = sum(theirs_map.get(k) == ours_map.get(k) for k in keys)
    assert len(theirs_map) >= 100 and len(ours_map) >= 100
    assert same / len(keys) >= 0.99, f"agreement {same}/{len(keys)}"
    print(f"agreement {same}/{len(keys)} rows; kept: koret {len(ours_map)}, library {len(theirs_map)}")


def test_resume_after_kill_reuses_finished_shards(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      encode__shard_size=20)
    path = write_config(tmp_path / "m.yaml", cfg)
    killed = run_subprocess("mine", "-c", str(path), "--quiet", env={"KORET_FAULT_AFTER_SHARDS": "3"})
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "out"
    assert not (out / "train.parquet").exists(), "no outputs from a killed run"
    shards = list((tmp_path / "cache").rglob("*.npy"))
    assert len(shards) == 3
    # a truncated shard (e.g. a disk that filled up) is detected and recomputed, never used
    victim = sorted(shards)[0]
    victim.write_bytes(victim.read_bytes()[:-17])

    resumed = run_subprocess("mine", "-c", str(path), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads((out / "stats.json").read_text())
    enc = stats["encode"]["passages"]
    total = -(-stats["data"]["passages"] // 20)
    assert total >= 5
    assert enc["shards_reused"] == 2, "the two intact shards are reused"
    assert enc["shards_computed"] == total - 2, "only the missing and the corrupt shard are encoded"

    fresh = write_config(tmp_path / "fresh.yaml", {**cfg, "cache_dir": str(tmp_path / "cache2"),
                                                   "output": {"dir": str(tmp_path / "fresh")}})
    assert run_cli("mine", "-c", str(fresh), "--quiet").exit_code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "train.parquet"),
                                  pd.read_parquet(tmp_path / "fresh" / "train.parquet"), rtol=0, atol=1e-6)


def test_float16_cache_halves_the_files_and_scores_are_exact_products_of_what_it_stores(tmp_path, tiny_model,
                                                                                       data_dir):
    full = _mine(tmp_path, tiny_model, data_dir, "a.yaml")
    half = _mine(tmp_path, tiny_model, data_dir, "b.yaml", out="half", cache="cache16", encode__dtype="float16")
    manifest = json.loads((half / "embeddings.json").read_text())
    passages = np.concatenate([np.load(f) for f in manifest["passages"]])
    queries = np.concatenate([np.load(f) for f in manifest["queries"]])
    assert passages.dtype == queries.dtype == np.float16
    size = {name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*.npy")) for name in ("cache", "cache16")}
    assert size["cache16"] < 0.52 * size["cache"]
    assert json.loads((half / "stats.json").read_text())["encode"]["passages"]["storage"] == "float16"

    cands = pd.read_parquet(half / "candidates.parquet")
    for row, (ids, got) in enumerate(zip(cands.candidate_ids, cands.teacher_candidate_scores, strict=True)):
        exact = (passages[ids].astype(np.float64) @ queries[row].astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(got, exact)  # the float64 product of the stored values, rounded once
        every = (passages.astype(np.float64) @ queries[row].astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(ids, np.lexsort((np.arange(len(every)), -every))[:len(ids)])  # exact top-k
    ours = pd.read_parquet(full / "candidates.parquet")
    same = np.mean([len(set(a[:10]) & set(b[:10])) / 10
                    for a, b in zip(ours.candidate_ids, cands.candidate_ids, strict=True)])
    assert same > 0.9, same  # rounding the stored vectors to float16 moves few candidates


def test_nfd_copy_gives_identical_train(tmp_path, tiny_model, data_dir, pairs):
    nfd = tmp_path / "nfd"
    nfd.mkdir()
    with open(nfd / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for r in pairs:
            row = {"query": unicodedata.normalize("NFD", r["query"]) + "  ",
                   "positive": unicodedata.normalize("NFD", r["positive"]).replace(" ", "\u00a0 ", 1)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    text = (data_dir / "corpus.txt").read_text(encoding="utf-8")
    (nfd / "corpus.txt").write_text(unicodedata.normalize("NFD", text), encoding="utf-8")
    assert (nfd / "pairs.jsonl").read_bytes() != (data_dir / "pairs.jsonl").read_bytes()

    a = _mine(tmp_path, tiny_model, data_dir, "a.yaml")
    b_cfg = mine_config(tmp_path, tiny_model, nfd / "pairs.jsonl", data__corpus=str(nfd / "corpus.txt"), out="nfd-out")
    assert run_cli("mine", "-c", str(write_config(tmp_path / "b.yaml", b_cfg)), "--quiet").exit_code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(a / "train.parquet"),
                                  pd.read_parquet(tmp_path / "nfd-out" / "train.parquet"))


def test_rescore_with_cross_encoder_drives_filtering(tmp_path, tiny_model, tiny_cross_encoder, data_dir):
    out = _mine(tmp_path, tiny_model, data_dir, rescore__model=str(tiny_cross_encoder), filter__strategy="margin_pos",
                filter__margin=0.0)
    cands = pd.read_parquet(out / "candidates.parquet")
    assert {"rescore_candidate_scores", "rescore_positive_scores", "teacher_candidate_scores"} <= set(cands.columns)
    row = cands.iloc[0]
    assert len(row.rescore_candidate_scores) == len(row.candidate_ids) == len(row.teacher_candidate_scores)
    assert np.all(np.diff(row.rescore_candidate_scores) <= 1e-6), "re-ranked by the cross-encoder"

    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    corpus = pd.read_parquet(out / "corpus.parquet").text.tolist()
    expect = ce.predict([(row.query, corpus[i]) for i in row.candidate_ids[:5]])
    np.testing.assert_allclose(row.rescore_candidate_scores[:5], expect, atol=1e-5)
    train = pd.read_parquet(out / "train.parquet")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rescored"] is True
    for scores in train.scores:  # margin 0 on cross-encoder scores: negatives never above the positive
        assert all(n <= scores[0] + 1e-6 for n in scores[1:])


def test_pad_random_fills_short_rows(tmp_path, tiny_model, data_dir):
    out = _mine(tmp_path, tiny_model, data_dir, filter__perc=0.9, filter__on_shortage="pad_random",
                search__top_k=5)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shortage"]["rows"] > 0
    assert stats["shortage"]["padded_negatives"] > 0
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) > stats["rows_in"] - stats["shortage"]["rows"]
    for scores in train.scores:  # padded negatives carry their exact teacher score and pass the same rule
        assert np.isfinite(scores).all()
        assert all(n <= scores[0] * 0.9 + 1e-6 for n in scores[1:])
        assert list(scores[1:]) == sorted(scores[1:], reverse=True)
    # koret filter pads the same way from the cached teacher embeddings
    result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", f"output.dir={tmp_path}/refiltered",
                     "--set", f"filter.candidates={out}", "--quiet")
    assert result.exit_code == 0, result.stderr
    pd.testing.assert_frame_equal(train, pd.read_parquet(tmp_path / "refiltered" / "train.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("processes,extra", [(2, "rescore"),
                                             (3, "lexical, float16 cache, random sampling and padding, calibrated")])
def test_many_processes_write_the_same_outputs(tmp_path, tiny_model, tiny_cross_encoder, data_dir, processes,
                                               extra):
    """Each process encodes and searches its slice of the corpus, rescores and filters its range of queries;
    the outputs equal one process's (random draws included: they are keyed by global row)."""
    extra = {"search__lexical": {"top_k": 10}, "encode__dtype": "float16", "filter__sampling": "random",
             "filter__on_shortage": "pad_random", "filter__range_max": 4, "filter__scale": "calibrated"} \
        if extra.startswith("lexical") else {"rescore__model": str(tiny_cross_encoder)}
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      encode__shard_size=25, out="many", **extra)
    path = write_config(tmp_path / "m.yaml", cfg)
    many = run_subprocess("mine", "-c", str(path), "--num-processes", str(processes), "--quiet")
    assert many.returncode == 0, many.stderr[-3000:]
    stats = json.loads((tmp_path / "many" / "stats.json").read_text())
    assert stats["encode"]["passages"]["processes"] == processes
    assert stats["search"]["backend"].endswith(f"x {processes} slices")
    if "filter__on_shortage" in extra:
        assert stats["shortage"]["padded_negatives"] > 20, stats["shortage"]  # the padding was exercised
    one = write_config(tmp_path / "one.yaml", {**cfg, "cache_dir": str(tmp_path / "c1"),
                                               "output": {"dir": str(tmp_path / "one")}})
    assert run_cli("mine", "-c", str(one), "--quiet").exit_code == 0
    for name in ("candidates.parquet", "train.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / name),
                                      pd.read_parquet(tmp_path / "many" / name), rtol=0, atol=1e-6)
    alone = json.loads((tmp_path / "one" / "stats.json").read_text())
    for key in ("rows_in", "rows_out", "candidates_considered", "filtered", "shortage", "survivors_per_row",
                "negative_sources"):
        assert stats.get(key) == alone.get(key), key  # the joined choices count what one process counts
    for side in ("positive", "negative"):
        assert stats["scores"][side] == pytest.approx(alone["scores"][side], abs=1e-6)
    # the calibration figures (the same seeded random pairs, scored exactly; the cross-encoder's in batches)
    cal, cal_alone = stats["calibration"], alone["calibration"]
    assert cal["random_pairs"] == cal_alone["random_pairs"] > 0 and cal["positive_rows"] == cal_alone["positive_rows"]
    if "rescore__model" in extra:
        assert {k: v for k, v in cal.items() if k != "formula"} == pytest.approx(
            {k: v for k, v in cal_alone.items() if k != "formula"}, abs=1e-6)
        # the scale of the scores that drive the filter: the cross-encoder's, not the teacher's
        rescored = pd.read_parquet(tmp_path / "many" / "candidates.parquet").rescore_positive_scores
        assert cal["positive_median"] == pytest.approx(float(np.median(np.concatenate(rescored.tolist()))), abs=1e-6)
    else:  # teacher cosines: bit for bit, and the filter ran on the calibrated scale
        assert cal == cal_alone and stats["settings"]["scale"] == "calibrated"


def _beir(root: Path, pairs, zero_judged: int) -> Path:
    (root / "qrels").mkdir(parents=True)
    rows = pairs[2:32]  # distinct query texts
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["positive"]},
                                                          ensure_ascii=False) + "\n" for i, r in enumerate(rows)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]},
                                                           ensure_ascii=False) + "\n" for i, r in enumerate(rows)))
    (root / "qrels" / "train.tsv").write_text("".join(f"q{i}\td{i}\t{0 if i < zero_judged else 1}\n"
                                                      for i in range(len(rows))))
    return root


def test_queries_without_a_positive_are_skipped_before_any_model_loads(tmp_path, tiny_model, pairs, monkeypatch):
    some = _beir(tmp_path / "some", pairs, zero_judged=3)
    cfg = mine_config(tmp_path, tiny_model, some, search__top_k=10)
    r = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == 27 and stats["data"]["skipped"] == {"queries without a positive skipped": 3}

    import koret.mine as m

    def no_model(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(m, "load_sentence_transformer", no_model)
    none = _beir(tmp_path / "none", pairs, zero_judged=30)
    cfg = mine_config(tmp_path, tiny_model, none, out="out2", cache="cache2", search__top_k=10)
    r = run_cli("mine", "-c", str(write_config(tmp_path / "m2.yaml", cfg)))
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: data.train: {none}: no query has a positive (relevance > 0) (check the qrels / positive column)"]
    assert not (tmp_path / "out2").exists() and not (tmp_path / "cache2").exists()


DIE_IN_SEARCH = """
import os
if os.environ.get("RANK") == "1":
    import signal
    import koret.search as s
    _search = s.search
    def search(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's OOM killer, in the middle of the collective search
    s.search = search
"""


def test_a_process_that_dies_fails_the_run_with_one_line_and_a_rerun_reuses_its_shards(tmp_path, tiny_model,
                                                                                       data_dir):
    """One of two processes is killed (SIGKILL) while the other waits for it in the sharded search: the run ends
    quickly with one line, no traceback and no outputs; the rerun encodes nothing again."""
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      encode__shard_size=25)
    path = write_config(tmp_path / "m.yaml", cfg)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_IN_SEARCH)
    started = time.monotonic()
    died = run_subprocess("mine", "-c", str(path), "--num-processes", "2", timeout=240,
                          env={"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])})
    assert time.monotonic() - started < 200
    assert died.returncode == 1, died.stderr[-3000:]
    lines = [line for line in died.stderr.splitlines() if line.strip()]
    assert "Traceback" not in died.stderr, died.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ["error: process 1 of 2 was killed by SIGKILL (out of memory?), so the run stopped; rerun "
                      "the same command to resume: finished embedding shards are reused (koret train: add --resume)"
                      ], died.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    again = run_subprocess("mine", "-c", str(path), "--num-processes", "2", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    enc = json.loads((tmp_path / "out" / "stats.json").read_text())["encode"]["passages"]
    assert enc["shards_computed"] == 0 and enc["shards_reused"] >= 4


def test_a_collective_that_loses_its_peer_is_one_line(monkeypatch):
    from koret import dist

    monkeypatch.delenv("KORET_LAUNCHER", raising=False)
    with pytest.raises(dist.PeerLost) as err, dist._collective("gather_object"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:15502.\nmore")
    assert str(err.value).startswith("another process of this run stopped while this one waited in gather_object "
                                     "(RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


def test_several_processes_without_a_cache_dir_fail_before_any_model_loads(tmp_path, tiny_model, data_dir,
                                                                          monkeypatch):
    """The processes share the corpus and query embeddings through cache_dir: without one a multi-process mine
    used to encode the whole corpus and only then fail, at the queries. Now it stops before the teacher loads."""
    import koret.mine as m
    from koret.config import MineConfig
    from koret.errors import KoretError

    def no_model(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(m, "load_sentence_transformer", no_model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      cache_dir="")
    with pytest.raises(KoretError) as err:
        m.mine(MineConfig.model_validate(cfg))
    assert str(err.value) == ("cache_dir: not set, and the 2 processes of this run share the corpus and query "
                              "embeddings through it (set cache_dir to a folder every process sees)")
    assert not (tmp_path / "out").exists()


NO_TEACHER = """
import koret.encode as e
def load_sentence_transformer(*a, **k):
    raise SystemExit("the teacher was loaded")
e.load_sentence_transformer = load_sentence_transformer
"""


@pytest.mark.slow
def test_a_two_process_mine_without_a_cache_dir_ends_with_one_line_before_the_teacher_loads(tmp_path, tiny_model,
                                                                                            data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      cache_dir="")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_TEACHER)
    r = run_subprocess("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--num-processes", "2",
                       timeout=240, env={"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "the teacher was loaded" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and errors[0] in [  # either process may be the one the launcher names
        f"error: process {rank} of 2: cache_dir: not set, and the 2 processes of this run share the corpus and "
        "query embeddings through it (set cache_dir to a folder every process sees)" for rank in (0, 1)], errors


def test_mine_with_data_sample_writes_the_drawn_queries_rows(tmp_path, tiny_model, data_dir):
    """data.sample 20 (seed 0) draws one of the first query's two rows: mine writes the 20 drawn rows and that
    query's other positive (21), never the undrawn positive as a negative; the corpus stays whole."""
    import pandas as pd

    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__sample=20, search__top_k=10,
                      filter__num_negatives=2, filter__strategy="naive")  # naive: no row is short of negatives
    assert run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet").exit_code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == 21, stats["rows_in"]
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    first = train[train["anchor"] == "서울에서 가장 오래된 시장은 어디인가?"]
    positives = set(first["positive"])
    assert len(positives) == 2
    negatives = set(first[[c for c in train.columns if c.startswith("negative_")]].to_numpy().ravel())
    assert not positives & negatives
