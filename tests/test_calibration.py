"""filter.scale: calibrated: thresholds on the teacher's own scale select the same negatives on a teacher whose
scores are an affine map of another's; the figures koret mine measures reach stats.json and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import mine_config, run_cli, write_config

from koret.calibration import Calibration, calibrate, random_pairs
from koret.errors import KoretError
from koret.filter_rules import Candidates, FilterSettings, choose
from koret.report import fmt

Q, N, K = 120, 400, 12  # queries, passages, candidates per query


def teacher_a() -> np.ndarray:
    """Teacher A's scores of every (query, passage) pair, MiniLM-like: random pairs near 0.05, positives near
    0.55, a few near-copies of the positive just under it (the kind of candidate a filter must drop)."""
    rng = np.random.default_rng(0)
    s = rng.normal(0.05, 0.08, size=(Q, N))
    hard = rng.integers(N, size=(Q, 20))
    s[np.arange(Q)[:, None], hard] += rng.uniform(0.15, 0.4, size=(Q, 20))
    pos = rng.uniform(0.45, 0.7, size=Q)
    s[np.arange(Q), np.arange(Q)] = pos  # query q's positive is passage q
    copies = rng.integers(Q, N, size=Q)
    s[np.arange(Q), copies] = pos - rng.uniform(0.0, 0.06, size=Q)
    return s.astype(np.float32)


def candidates(s: np.ndarray) -> Candidates:
    """Each query's top-K non-positive passages under scores ``s``, with the calibration measured on ``s``."""
    masked = s.copy()
    masked[np.arange(Q), np.arange(Q)] = -np.inf
    ids = np.argsort(-masked, axis=1, kind="stable")[:, :K]
    positive_ids = [np.array([q]) for q in range(Q)]
    positive_scores = [np.array([s[q, q]], np.float32) for q in range(Q)]
    rq, rp = random_pairs(Q, N, positive_ids, np.arange(N), seed=42)
    cal = calibrate(s[rq, rp], np.concatenate(positive_scores))
    return Candidates([f"q{q}" for q in range(Q)], [f"질문 {q}" for q in range(Q)], positive_ids, positive_scores,
                      ids, np.take_along_axis(s, ids, 1), calibration=cal)


def chosen(s: np.ndarray, **settings) -> tuple[np.ndarray, int, int]:
    """The chosen negatives of every row (-2 for a dropped row), how many candidates the thresholds removed and
    how many random passages padded short rows."""
    def score(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
        return s[queries, passages]

    c = choose(candidates(s), np.arange(N), FilterSettings(num_negatives=3, max_overlap=None, **settings), score)
    return (np.where(c.kept[:, None], c.negative_ids, -2), sum(c.counts[r] for r in ("margin", "max_score", "min_score")),
            c.padded)


# a compressed teacher (e5-like: random pairs near 0.77, positives near 0.9) and a stretched, shifted one
AFFINE = [(0.25, 0.76), (3.0, -2.0)]
SETTINGS = [
    {"strategy": "perc_pos", "perc": 0.9},
    {"strategy": "perc_pos", "perc": 0.6, "min_score": -0.2, "on_shortage": "pad_random"},
    {"strategy": "margin_pos", "margin": 0.1},
    {"strategy": "abs", "max_score": 0.8},
    {"strategy": "naive", "min_score": 0.5, "max_score": 0.95},
]


@pytest.mark.parametrize("a,b", AFFINE)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_calibrated_thresholds_choose_the_same_negatives_on_an_affine_map_of_the_teacher(settings, a, b):
    s = teacher_a()
    s_b = (np.float64(a) * s + b).astype(np.float32)
    ours, dropped, padded = chosen(s, scale="calibrated", **settings)
    theirs, _, _ = chosen(s_b, scale="calibrated", **settings)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours >= 0).any() and dropped > 0, "the test must filter something"
    assert padded > 0 or settings.get("on_shortage") != "pad_random", "padding draws are judged on the scale too"


@pytest.mark.parametrize("a,b", AFFINE)
@pytest.mark.parametrize("settings", [{"strategy": "perc_pos", "perc": 0.9}, {"strategy": "margin_pos", "margin": 0.1},
                                      {"strategy": "abs", "max_score": 0.5}], ids=lambda s: s["strategy"])
def test_raw_thresholds_choose_other_negatives_on_the_affine_map(settings, a, b):
    """What calibration is for: the same raw setting means something else on the other teacher."""
    s = teacher_a()
    s_b = (np.float64(a) * s + b).astype(np.float32)
    assert (chosen(s, scale="raw", **settings)[0] != chosen(s_b, scale="raw", **settings)[0]).any()
    # and on the calibrated scale, the one teacher's choice is the other's (the test above, for these settings)
    np.testing.assert_array_equal(chosen(s, scale="calibrated", **settings)[0],
                                  chosen(s_b, scale="calibrated", **settings)[0])


def test_calibrated_scale_maps_random_pairs_to_0_and_the_median_positive_to_1():
    cal = calibrate([0.1, 0.2, 0.3, np.nan], [0.5, 0.9, 0.7, -np.inf])
    assert cal == Calibration(random_mean=pytest.approx(0.2), random_std=pytest.approx(np.std([0.1, 0.2, 0.3])),
                              random_pairs=3, positive_median=0.7, positive_rows=3)
    np.testing.assert_allclose(cal.apply([0.2, 0.7, 0.45, -np.inf]), [0.0, 1.0, 0.5, -np.inf], atol=1e-6)
    assert Calibration.from_dict(json.loads(json.dumps(cal.as_dict()))) == cal
    assert calibrate([], [0.5]) is None
    with pytest.raises(KoretError, match="filter.scale: calibrated needs positives that score above random"):
        calibrate([0.5, 0.6], [0.4]).apply([0.3])


def test_random_pairs_are_seeded_sorted_and_never_a_positive():
    groups = np.array([0, 1, 1, 2, 3, 4])  # passages 1 and 2: one normalized text
    positive_ids = [np.array([1]), np.array([0, 3])]
    q, p = random_pairs(2, 6, positive_ids, groups, seed=3, n=500)
    q2, p2 = random_pairs(2, 6, positive_ids, groups, seed=3, n=500)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(p, p2)
    assert not ((q == 0) & np.isin(p, [1, 2])).any() and not ((q == 1) & np.isin(p, [0, 3])).any()
    assert 250 < len(q) < 500 and set(p[q == 0].tolist()) == {0, 3, 4, 5}
    assert (np.diff(q) >= 0).all()
    assert not (random_pairs(2, 6, positive_ids, groups, seed=4, n=500)[1][:50] == p[:50]).all()


def test_uncalibrated_candidates_refuse_the_calibrated_scale():
    c = candidates(teacher_a())
    c.calibration = None
    with pytest.raises(KoretError, match="filter.scale: calibrated needs the teacher's calibration figures"):
        choose(c, np.arange(N), FilterSettings(strategy="perc_pos", scale="calibrated", max_overlap=None))


def test_a_range_of_queries_keeps_the_figures_of_all():
    c = candidates(teacher_a())
    assert c.take(range(3, 5)).calibration is c.calibration


# --------------------------------------------------------------------------------------------- through koret mine


def affine_teacher(model: Path, out: Path, a: float) -> Path:
    """``model`` followed by x -> [sqrt(a) x, sqrt(1 - a)]: unit vectors whose cosines are a x cos + (1 - a)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    st = SentenceTransformer(str(model), device="cpu")
    dim = st.get_sentence_embedding_dimension()
    dense = Dense(dim, dim + 1, bias=True, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.zero_()
        dense.linear.weight[:dim].copy_(torch.eye(dim) * a ** 0.5)
        dense.linear.bias.zero_()
        dense.linear.bias[dim] = (1 - a) ** 0.5
    SentenceTransformer(modules=[*st, dense], device="cpu", prompts=st.prompts).save(str(out))
    return out


def test_mine_on_an_affine_teacher_chooses_the_same_negatives_when_calibrated(tmp_path, tiny_model, data_dir):
    teacher_b = affine_teacher(tiny_model, tmp_path / "affine", 0.25)
    outs = {}
    for name, model in (("a", tiny_model), ("b", teacher_b)):
        cfg = mine_config(tmp_path, model, data_dir / "pairs.jsonl", out=name, data__corpus=str(data_dir / "corpus.txt"),
                          filter__strategy="perc_pos", filter__scale="calibrated", filter__perc=0.8)
        result = run_cli("mine", "-c", str(write_config(tmp_path / f"{name}.yaml", cfg)))
        assert result.exit_code == 0, result.stderr
        outs[name] = tmp_path / name
        # the summary prints the calibration figures that stats.json holds
        cal = json.loads((outs[name] / "stats.json").read_text())["calibration"]
        assert cal["random_pairs"] > 1000 and cal["positive_rows"] > 100
        for label, value in (("random-pair score mean", cal["random_mean"]),
                             ("positive score median", cal["positive_median"])):
            line = next(line for line in result.stderr.splitlines() if f"calibration: {label}" in line)
            assert line.rstrip(" │").endswith(" " + fmt(value)), line
    cal_a, cal_b = (json.loads((outs[n] / "stats.json").read_text())["calibration"] for n in "ab")
    # the affine map shows in the figures: b's mean random pair and median positive are 0.25 x a's + 0.75
    assert cal_b["random_mean"] == pytest.approx(0.25 * cal_a["random_mean"] + 0.75, abs=1e-5)
    assert cal_b["positive_median"] == pytest.approx(0.25 * cal_a["positive_median"] + 0.75, abs=1e-5)
    negatives = ["negative_1", "negative_2", "negative_3"]
    train_a, train_b = (pd.read_parquet(outs[n] / "train.parquet") for n in "ab")
    pd.testing.assert_frame_equal(train_a[["anchor", "positive", *negatives]], train_b[["anchor", "positive", *negatives]])
    # perc on the raw scale (koret filter, no model) does not: the compressed teacher drops less
    rows = {}
    for n in "ab":
        result = run_cli("filter", "-c", str(outs[n] / "config.yaml"), "--set", "filter.scale=raw",
                         "--set", "filter.perc=0.95",
                         "--set", f"filter.candidates={outs[n]}", "--set", f"output.dir={tmp_path}/{n}-raw", "--quiet")
        assert result.exit_code == 0, result.stderr
        rows[n] = pd.read_parquet(tmp_path / f"{n}-raw" / "train.parquet")[["anchor", "positive", *negatives]]
        assert json.loads((tmp_path / f"{n}-raw" / "stats.json").read_text())["calibration"] == \
            json.loads((outs[n] / "stats.json").read_text())["calibration"]
    assert len(rows["a"]) > 0  # not two empty frames: the comparison below is not vacuous
    assert not rows["a"].equals(rows["b"])
    # re-filtering on the calibrated scale reproduces the mine's rows; the scores stay raw
    result = run_cli("filter", "-c", str(outs["b"] / "config.yaml"), "--set", f"filter.candidates={outs['b']}",
                     "--set", f"output.dir={tmp_path}/b-again", "--quiet")
    assert result.exit_code == 0, result.stderr
    pd.testing.assert_frame_equal(train_b, pd.read_parquet(tmp_path / "b-again" / "train.parquet"))
    calib = Calibration.from_dict(cal_b)
    for scores in train_b.scores:
        pos, *neg = calib.apply(scores)
        assert all(n <= pos * 0.8 + 1e-5 for n in neg)
        assert min(scores) > 0.5  # raw cosines of the compressed teacher


def test_filter_refuses_the_calibrated_scale_without_the_figures(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"))
    assert run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet").exit_code == 0
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    cal = stats.pop("calibration")  # a mine folder of an older koret
    (out / "stats.json").write_text(json.dumps(stats))
    result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", "filter.scale=calibrated",
                     "--set", f"filter.candidates={out}", "--set", f"output.dir={tmp_path}/f", "--quiet")
    assert result.exit_code == 2
    assert "filter.scale: calibrated needs the teacher's calibration figures" in result.stderr
    assert not (tmp_path / "f" / "train.parquet").exists()
    # a record that lacks a figure, or holds something else than a number: one line on the calibrated scale only
    for broken in ({k: v for k, v in cal.items() if k != "positive_median"}, {**cal, "random_mean": "n/a"}):
        (out / "stats.json").write_text(json.dumps({**stats, "calibration": broken}))
        result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", "filter.scale=calibrated",
                         "--set", f"filter.candidates={out}", "--set", f"output.dir={tmp_path}/f", "--quiet")
        assert result.exit_code == 2, result.stderr
        assert result.stderr.strip().splitlines()[0].startswith(
            f"error: filter.scale: calibrated: the calibration record of {out / 'stats.json'} is incomplete")
        assert not (tmp_path / "f" / "train.parquet").exists()
    result = run_cli("filter", "-c", str(out / "config.yaml"), "--set", "filter.scale=raw",
                     "--set", f"filter.candidates={out}", "--set", f"output.dir={tmp_path}/f", "--quiet")
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------------------------- the benchmark


def _bench():
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_false_negatives

    return bench_false_negatives


def test_where_planted_reads_scores_as_perc_pos_does():
    """The benchmark's "score over positive" is the value perc_pos compares with perc: score / positive above 0,
    and below 1 for a score under a positive below 0 (a calibrated positive can be, where a plain ratio flips)."""
    b = _bench()
    assert b.perc_over_positive(0.9, 1.0) == pytest.approx(0.9)
    assert b.perc_over_positive(-0.6, -0.5) == pytest.approx(0.8)  # under the positive: below 1 (the ratio: 1.2)
    assert b.perc_over_positive(-0.4, -0.5) == pytest.approx(1.2)  # above it: over 1
    for positive, perc in ((0.8, 0.9), (-0.5, 0.9), (2.0, 0.7)):  # exactly at koret's threshold: perc itself
        threshold = positive - abs(positive) * (1 - perc)
        assert b.perc_over_positive(threshold, positive) == pytest.approx(perc)


def test_docs_show_the_false_negative_tables_as_measured():
    """docs/benchmarks.md's false-negative tables are what bench/results/false_negatives.json makes, line for line,
    and its bars follow from the rows of the same teacher."""
    from helpers import REPO

    b = _bench()
    data = json.loads((REPO / "bench" / "results" / "false_negatives.json").read_text())
    md = b.markdown(data["data"], data["runs"], data["seconds"], None)
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| ", "**"))]
    assert len(rows) > 20 and all(line in docs for line in rows), "docs/benchmarks.md is out of date"
    for run in data["runs"]:
        settings = [dict(r) for r in run["settings"]]
        b.meets_targets(settings)
        assert [(r["planted_within_1_5x_perc_pos"], r["rank_within_1_5x_naive"]) for r in settings] == \
            [(r["planted_within_1_5x_perc_pos"], r["rank_within_1_5x_naive"]) for r in run["settings"]]
