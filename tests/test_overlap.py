"""filter.max_overlap: a candidate whose text nearly duplicates one of its query's positives is dropped, whatever
the strategy; the measure ignores whitespace and Unicode normalization; through koret mine and koret filter."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pandas as pd
import pytest
from helpers import mine_config, run_cli, write_config

from koret.errors import KoretError
from koret.filter_rules import Candidates, FilterSettings, choose, filter_candidates
from koret.overlap import candidate_overlap, text_overlap

POSITIVE = ("세종대왕은 1418년에 조선의 제4대 왕으로 즉위하였다. 그는 집현전을 설치하여 학자들을 양성하였다. "
            "1443년에는 훈민정음을 창제하였고 1446년에 이를 반포하였다. 또한 측우기와 해시계 같은 과학 기구의 "
            "제작을 지원하였다.")
REORDERED = ("1443년에는 훈민정음을 창제하였고 1446년에 이를 반포하였다. 또한 측우기와 해시계 같은 과학 기구의 "
             "제작을 지원하였다. 세종대왕은 1418년에 조선의 제4대 왕으로 즉위하였다. 그는 집현전을 설치하여 "
             "학자들을 양성하였다.")
REWORDED = ("세종대왕은 1418년에 조선의 제4대 왕으로 즉위했다. 1443년에는 훈민정음을 창제하였고 1446년에 "
            "이를 반포하였다. 또 측우기와 해시계 같은 과학 기구의 제작을 지원하였다.")  # a sentence dropped, contractions
HARD_NEGATIVE = ("세종대왕의 아들 문종은 1450년에 왕위에 올랐으나 몸이 약하여 2년 만에 세상을 떠났다. 그 뒤를 이어 "
                 "어린 단종이 즉위하였다.")  # the same subject, a few shared words, another answer


def test_reordered_and_reworded_copies_overlap_and_a_hard_negative_does_not():
    assert text_overlap(REORDERED, POSITIVE) > 0.95
    assert text_overlap(REWORDED, POSITIVE) > 0.9
    assert text_overlap(HARD_NEGATIVE, POSITIVE) < 0.35
    # symmetric: the share of the smaller text's 3-grams found in the larger
    assert text_overlap(POSITIVE, REWORDED) == text_overlap(REWORDED, POSITIVE)


def test_whitespace_case_and_unicode_normalization_do_not_count():
    nfd = unicodedata.normalize("NFD", POSITIVE)
    assert nfd != POSITIVE
    respaced = POSITIVE.replace(" ", "  ").replace("1418년에", "1418 년에").replace("제4대 왕", "제4대왕") + "\n"
    assert text_overlap(nfd, POSITIVE) == 1.0
    assert text_overlap(respaced, POSITIVE) == 1.0
    assert text_overlap("KoRet Filter", "koret\tfilter") == 1.0
    assert text_overlap("", POSITIVE) == 0.0


def _cands(corpus: list[str]) -> Candidates:
    # query 0's positive is passage 0; its candidates, best first: the reordered copy, the reworded one, the hard
    # negative, then two unrelated passages
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    scores = np.array([[0.95, 0.93, 0.90, 0.80, 0.70]], dtype=np.float32)
    c = Candidates(["q0"], ["세종대왕이 훈민정음을 반포한 해는?"], [np.array([0])], [np.array([1.0], np.float32)],
                   ids, scores)
    c.overlap = candidate_overlap(corpus, c.positive_ids, c.candidate_ids)
    return c


CORPUS = [POSITIVE, REORDERED, REWORDED, HARD_NEGATIVE, "부산은 한국 제2의 도시로 항구가 유명하다.",
          "장마는 대개 6월 하순에 시작된다."]


@pytest.mark.parametrize("extra", [{"strategy": "naive"},
                                   {"strategy": "perc_pos", "perc": 0.99, "scale": "raw"}])
def test_the_guard_drops_the_copies_under_any_strategy_and_keeps_the_hard_negative(extra):
    groups = np.arange(len(CORPUS))
    cands = _cands(CORPUS)
    off = choose(cands, groups, FilterSettings(num_negatives=2, max_overlap=None, **extra))
    assert off.negative_ids.tolist() == [[1, 2]]  # the copies, as naive top-k takes them
    on = choose(cands, groups, FilterSettings(num_negatives=2, max_overlap=0.8, **extra))
    assert on.negative_ids.tolist() == [[3, 4]]  # the hard negative first: ranks count after the guard
    assert on.counts["overlap"] == 2 and off.counts["overlap"] == 0


def test_the_threshold_is_exclusive_and_bounded():
    scores = np.zeros((1, 4), np.float32)
    overlap = np.array([[0.5, 0.5000001, 0.49, 1.0]])
    keep, counts = filter_candidates(np.ones(1), scores, np.zeros((1, 4), bool),
                                     FilterSettings(strategy="naive", max_overlap=0.5), overlap=overlap)
    assert keep.tolist() == [[True, False, True, False]] and counts["overlap"] == 2
    keep, _ = filter_candidates(np.ones(1), scores, np.zeros((1, 4), bool),
                                FilterSettings(strategy="naive", max_overlap=1.0), overlap=overlap)
    assert keep.all()  # 1.0: only what overlaps more than fully, i.e. nothing
    for bad in (0.0, 1.5):
        with pytest.raises(KoretError, match="filter.max_overlap"):
            FilterSettings(strategy="naive", max_overlap=bad).check()
    with pytest.raises(KoretError, match="filter.max_overlap: the candidates carry no text overlaps"):
        c = _cands(CORPUS)
        c.overlap = None
        choose(c, np.arange(len(CORPUS)), FilterSettings(strategy="naive", max_overlap=0.5))


def test_mine_and_filter_drop_near_duplicates_and_count_them(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      filter__strategy="naive", filter__max_overlap=0.5)
    result = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    dropped = stats["filtered"]["near_duplicate"]
    # the count is the candidates over the threshold, computed here from the texts without koret's filter
    cands = pd.read_parquet(out / "candidates.parquet")
    corpus = pd.read_parquet(out / "corpus.parquet").text.tolist()
    groups = pd.read_parquet(out / "corpus.parquet").group.to_numpy()
    expected = 0
    for row in cands.itertuples():
        pos_groups = set(groups[row.positive_ids].tolist())
        for c in row.candidate_ids:
            if c >= 0 and groups[c] not in pos_groups:
                expected += max(text_overlap(corpus[c], corpus[p]) for p in row.positive_ids) > 0.5
    assert dropped == expected > 0
    line = next(x for x in result.stderr.splitlines() if "near-duplicate of a positive (text overlap > 0.5)" in x)
    assert line.rstrip(" │").endswith(f" {dropped:,}")
    train = pd.read_parquet(out / "train.parquet")
    for row in train.itertuples():
        for j in (1, 2, 3):
            assert text_overlap(getattr(row, f"negative_{j}"), row.positive) <= 0.5
    # koret filter re-applies it to the same rows; off, it drops nothing and the copies come back
    result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", f"filter.candidates={out}",
                     "--set", f"output.dir={tmp_path}/again", "--quiet")
    assert result.exit_code == 0, result.stderr
    pd.testing.assert_frame_equal(train, pd.read_parquet(tmp_path / "again" / "train.parquet"))
    assert json.loads((tmp_path / "again" / "stats.json").read_text())["filtered"]["near_duplicate"] == dropped
    result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", f"filter.candidates={out}",
                     "--set", "filter.max_overlap=null", "--set", f"output.dir={tmp_path}/off", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "off" / "stats.json").read_text())["filtered"]["near_duplicate"] == 0
    off = pd.read_parquet(tmp_path / "off" / "train.parquet")
    assert max(text_overlap(getattr(r, f"negative_{j}"), r.positive) for r in off.itertuples() for j in (1, 2, 3)) > 0.5
