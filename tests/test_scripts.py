"""The GPU check runs end to end on CPU at toy sizes, so the GPU run cannot fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_gpu_check_smoke(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env={"PYTHON": sys.executable,
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["check"].split(" ")[0] + " " + c["check"].split(" ")[1]: c for c in data["checks"]}
    assert set(checks) == {"encode bert-base", "search 5,000", "2-process search", "koret train", "lora train",
                           "accelerate launch"}
    sharded = checks["2-process search"]  # koret mine's sharded search on 2 processes: auto and bfloat16 selection
    assert sharded["exact_by_variant"] == {"auto": [True, True], "bfloat16": [True, True]}, sharded
    assert checks["encode bert-base"]["tokens_per_s"] > 0
    assert checks["search 5,000"]["recall@10_vs_fp32"] == 1.0
    assert checks["search 5,000"]["ids_equal_fp64"] and checks["search 5,000"]["scores_exact"]
    assert checks["search 5,000"]["pairs_per_s"] > 0 and checks["search 5,000"]["upload_gb_per_s"] > 0
    run = checks["accelerate launch"]
    assert run["stages"] == ["ran", "ran", "ran"] and run["stored_scores_exact_fp32"], run
    assert checks["koret train"]["steps_per_s"] > 0
    lora = checks["lora train"]  # a LoRA step on a small decoder: sdpa, the adapter trained (bf16 on a GPU)
    assert lora["lora_ok"] and lora["adapter_trained"] and "sdpa" in lora["check"] and lora["steps_per_s"] > 0
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"]
    assert "tokens/s" in result.stdout and "steps/s" in result.stdout


def test_docs_show_the_quality_study_as_measured():
    """docs/quality.md's table is bench/results/quality.md, written by make quality, line for line; every arm
    carries each suite set and the macro average, whose value is the mean of the sets' (its label)."""
    md = REPO / "bench" / "results" / "quality.md"
    data = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    page = (REPO / "docs" / "quality.md").read_text()
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) >= 4 and all(line in page for line in rows), "docs/quality.md is out of date: make quality"
    suite = data["meta"]["suite"]
    base = next(a for a in data["arms"] if a["arm"] == "base")
    assert f"| base | {base['what']} | {base['sets'][suite[0]]['metrics']['ndcg@10'] * 100:.2f} |" in page
    for arm in data["arms"]:
        assert set(arm["sets"]) == set(suite)
        mean = sum(arm["sets"][s]["metrics"]["ndcg@10"] for s in suite) / len(suite)
        assert abs(arm["average"]["metrics"]["ndcg@10"] - mean) < 1e-12, arm["arm"]
        for block in [*arm["sets"].values(), arm["average"]]:
            if "vs_base" in block:
                s = block["vs_base"]["ndcg@10"]
                assert s["ci_low"] <= s["delta"] <= s["ci_high"]
    arms = {a["arm"]: a for a in data["arms"]}
    for pair in data["pairs"]:  # "a - b": on the same queries, a's gain over base minus b's (the label's direction)
        assert pair["a"] != pair["b"] and set(pair["sets"]) == set(suite)
        for got, block_a, block_b in [*((pair["sets"][s], arms[pair["a"]]["sets"][s], arms[pair["b"]]["sets"][s])
                                        for s in suite),
                                      (pair["average"], arms[pair["a"]]["average"], arms[pair["b"]]["average"])]:
            want = block_a["vs_base"]["ndcg@10"]["delta"] - block_b["vs_base"]["ndcg@10"]["delta"]
            assert abs(got["ndcg@10"]["delta"] - want) < 1e-9, (pair["a"], pair["b"])


def _quality():
    sys.path.insert(0, str(REPO / "scripts"))
    import quality

    return quality


def _quality_arm(q, name, per_query, base, date="2026-12-02"):
    """An arm's record as quality.py writes it, its figures computed from its per-query NDCG@10 (``base``: the
    untrained model's, on the same queries)."""
    def block(values, base_values):
        mean, gain = sum(values) / len(values), (sum(values) - sum(base_values)) / len(values)
        return {"metrics": {"ndcg@10": mean}, "queries": len(values), "passages": 10,
                "vs_base": {"ndcg@10": {"delta": gain, "ci_low": gain - 0.1, "ci_high": gain + 0.1, "p_value": 0.5}}}

    sets = {n: block(per_query[n], base[n]) for n in per_query}
    average = {k: v for k, v in sets[q.EVAL_SET].items() if k != "vs_base"}
    average["metrics"] = {"ndcg@10": sum(b["metrics"]["ndcg@10"] for b in sets.values()) / len(sets)}
    gain = sum(b["vs_base"]["ndcg@10"]["delta"] for b in sets.values()) / len(sets)
    average["vs_base"] = {"ndcg@10": {"delta": gain, "ci_low": gain - 0.1, "ci_high": gain + 0.1, "p_value": 0.5}}
    return {"arm": name, "what": name, "date": date, "sets": sets, "average": average, "per_query_ndcg@10": per_query}


def test_quality_pairs_come_from_kept_per_query_values():
    """A pair is computed from both arms' per-query NDCG@10 (kept in quality.json, so a later session can pair a
    new arm with an old one); a pair with an arm measured before values were kept is the earlier run's, dated, as
    long as it still describes both arms; arms on different queries, or a kept list that does not add up to its
    arm's own NDCG@10, stop the study; every kept list averages to its set's NDCG@10."""
    import pytest

    quality = _quality()
    a, b = quality.DEFAULT_ARM, "naive_mnrl"
    base = {quality.EVAL_SET: [0.5, 0.5, 0.0, 0.5], quality.OOD_SET: [1.0, 0.0]}
    sets = {quality.EVAL_SET: [1.0, 0.5, 0.0, 1.0], quality.OOD_SET: [1.0, 1.0]}
    worse = {quality.EVAL_SET: [0.5, 0.5, 0.0, 1.0], quality.OOD_SET: [1.0, 0.0]}
    done = {a: _quality_arm(quality, a, sets, base, "2026-12-03"), b: _quality_arm(quality, b, worse, base)}
    (pair,) = quality.compare_pairs(done, [])
    assert (pair["a"], pair["b"], pair["date"]) == (a, b, "2026-12-03")
    assert pair["sets"][quality.EVAL_SET]["ndcg@10"]["delta"] == pytest.approx(0.125)
    assert pair["sets"][quality.OOD_SET]["ndcg@10"]["delta"] == pytest.approx(0.5)
    assert pair[quality.AVERAGE]["ndcg@10"]["delta"] == pytest.approx((0.125 + 0.5) / 2)
    # b measured before lists were kept: the earlier run's pair, while its deltas are still a's gain minus b's
    old_b = {k: v for k, v in done[b].items() if k != "per_query_ndcg@10"}
    old = {**pair, "date": "2026-12-01"}
    assert quality.compare_pairs({a: done[a], b: old_b}, [old]) == [old]
    assert quality.compare_pairs({a: done[a], b: old_b}, []) == []
    # a measured again since (another result): the earlier pair no longer describes it and is left out
    again = _quality_arm(quality, a, {**sets, quality.EVAL_SET: [1.0, 1.0, 0.0, 1.0]}, base)
    assert quality.compare_pairs({a: again, b: old_b}, [old]) == []
    with pytest.raises(SystemExit, match="different queries"):
        short = _quality_arm(quality, b, {**worse, quality.OOD_SET: [1.0]}, {**base, quality.OOD_SET: [1.0]})
        quality.compare_pairs({**done, b: short}, [])
    with pytest.raises(SystemExit, match="different queries"):  # a set one arm lacks
        only = _quality_arm(quality, b, {quality.EVAL_SET: worse[quality.EVAL_SET]}, base)
        quality.compare_pairs({a: only, b: done[a]}, [])
    # a kept list of the right length that does not average to the arm's NDCG@10 (edited, another eval's)
    edited = {**done[b], "per_query_ndcg@10": {**worse, quality.EVAL_SET: [1.0, 0.5, 0.0, 1.0]}}
    with pytest.raises(SystemExit, match="naive_mnrl's per-query NDCG@10 on korquad"):
        quality.compare_pairs({**done, b: edited}, [])
    data = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    for arm in data["arms"]:
        for name, values in arm.get("per_query_ndcg@10", {}).items():
            block = arm["sets"][name]
            assert len(values) == block["queries"]
            assert sum(values) / len(values) == pytest.approx(block["metrics"]["ndcg@10"], abs=1e-9), arm["arm"]


def _quality_main(q, monkeypatch, tmp_path, earlier, runs, argv):
    """quality.main() on a work folder holding ``runs`` (arm name: result.json) and an earlier quality.json
    (``earlier``), with nothing to train (every arm asked for is done); returns the quality.json it writes."""
    results = tmp_path / "results"
    results.mkdir(parents=True)
    (results / "quality.json").write_text(json.dumps(earlier))
    for name, result in runs.items():
        (tmp_path / "work" / name).mkdir(parents=True)
        (tmp_path / "work" / name / "result.json").write_text(json.dumps(result))
    monkeypatch.setattr(q, "RESULTS", results)
    monkeypatch.setattr(q, "DATA", tmp_path / "results" / "quality.json")  # any file that exists
    monkeypatch.setattr(q, "e5_model", lambda: "e5")
    monkeypatch.setattr(q, "update_doc", lambda *args: None)  # not docs/quality.md
    monkeypatch.setattr(q, "run_arm", lambda *args: (_ for _ in ()).throw(AssertionError("nothing to run")))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--work", str(tmp_path / "work"), *argv])
    q.main()
    return json.loads((results / "quality.json").read_text())


def _quality_meta(q, **change):
    meta = {"date": "2026-12-01", "steps": 30, "batch": 16, "lr": 2e-05, "temperature": 0.01, "max_seq_length": 256,
            "eval_max_seq_length": 256}
    return {**meta, **change}


def test_quality_keeps_every_measured_arm_of_the_same_settings(monkeypatch, tmp_path):
    """An arm not asked for is kept: from its run folder where it has one, else from the earlier quality.json;
    an earlier quality.json of other settings (--steps, --batch, ...) keeps nothing, so no table mixes sizes."""
    q = _quality()
    base = {q.EVAL_SET: [0.5, 0.5, 0.0, 0.5], q.OOD_SET: [1.0, 0.0]}
    guard = _quality_arm(q, q.DEFAULT_ARM, {q.EVAL_SET: [1.0, 0.5, 0.0, 1.0], q.OOD_SET: [1.0, 1.0]}, base)
    naive = _quality_arm(q, "naive_mnrl", {q.EVAL_SET: [0.5, 0.5, 0.0, 1.0], q.OOD_SET: [1.0, 0.0]}, base)
    del naive["per_query_ndcg@10"]  # measured before lists were kept
    rounds = _quality_arm(q, "default_rounds2", {q.EVAL_SET: [1.0, 1.0, 0.0, 1.0], q.OOD_SET: [1.0, 1.0]}, base)
    old_pair = q.compare_pairs({q.DEFAULT_ARM: guard, "naive_mnrl": {**naive, "per_query_ndcg@10": {
        q.EVAL_SET: [0.5, 0.5, 0.0, 1.0], q.OOD_SET: [1.0, 0.0]}}}, [])
    earlier = {"meta": _quality_meta(q), "arms": [naive, guard], "pairs": old_pair}
    runs = {q.DEFAULT_ARM: guard, "default_rounds2": rounds}
    out = _quality_main(q, monkeypatch, tmp_path, earlier, runs, ["--arms", "default_rounds2"])
    assert [a["arm"] for a in out["arms"]] == ["naive_mnrl", q.DEFAULT_ARM, "default_rounds2"]
    assert [(c["a"], c["b"]) for c in out["pairs"]] == [(q.DEFAULT_ARM, "naive_mnrl"),
                                                        ("default_rounds2", q.DEFAULT_ARM)]
    out = _quality_main(q, monkeypatch, tmp_path / "other", {**earlier, "meta": _quality_meta(q, steps=50)},
                        {"default_rounds2": rounds}, ["--arms", "default_rounds2", "--steps", "30"])
    assert [a["arm"] for a in out["arms"]] == ["default_rounds2"] and out["pairs"] == []


def test_a_two_round_arm_shares_round_one_with_an_arm_of_its_own_recipe():
    """A 2-round arm's round 1 is another arm's trained model (run_arm trains it into that arm's folder, arm_result
    adds that arm's steps and seconds, remine names its folder after it): that arm is one round, with the same
    candidates, filter, negatives, rows and training; so "2 rounds vs 1" compares round 2 with its own start."""
    q = _quality()
    arms = {a.name: a for a in q.ARMS}
    two = [a for a in q.ARMS if a.rounds == 2]
    assert two and all(a.rounds == 1 and not a.round1 for a in q.ARMS if a not in two)
    for arm in two:
        first = arms[arm.round1]  # a KeyError: a 2-round arm without its round-1 arm
        assert first.rounds == 1 and first.name != arm.name
        assert (first.mine, first.filter, first.negatives, first.rows, first.train) == \
            (arm.mine, arm.filter, arm.negatives, arm.rows, arm.train), arm.name
        assert (arm.name, first.name) in {(a, b) for a, b, _ in q.PAIRS} or arm.round_start == "base"


def test_the_quality_studys_default_arm_is_koret_s_default():
    """The arm marked "default" in quality.json trains on the filter koret ships: FilterConfig's defaults."""
    sys.path.insert(0, str(REPO / "scripts"))
    import quality

    from koret.config import FilterConfig

    shipped = FilterConfig()
    assert {k: getattr(shipped, k) for k in quality.DEFAULT_FILTER} == quality.DEFAULT_FILTER
    assert all(getattr(shipped, k) == v for k, v in (("scale", "raw"),) if k not in quality.DEFAULT_FILTER)
    arm = next(a for a in quality.ARMS if a.name == quality.DEFAULT_ARM)
    assert arm.filter == quality.DEFAULT_FILTER
    data = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    marked = [a["arm"] for a in data["arms"] if a.get("default")]
    ran = {a["arm"] for a in data["arms"]}
    assert marked == ([quality.DEFAULT_ARM] if quality.DEFAULT_ARM in ran else []), marked
    assert data["meta"]["default_filter"] == quality.DEFAULT_FILTER


def _projection():
    sys.path.insert(0, str(REPO / "scripts"))
    import projection

    return projection


def test_projection_rows_follow_from_their_rates():
    p = _projection()
    rates = p.Rates("test", encode_tokens_per_s=1e5, search_pairs_per_s=1e11, upload_bytes_per_s=1e10,
                    network_bytes_per_s=1e10, merge_elements_per_s=1e7)
    row = p.project(1_000_000_000, 8, 8, rates, queries=1_000_000)
    assert row["gpus"] == 64 and row["resident"]
    assert abs(row["slice_gib"] - 1e9 / 64 * 1024 * 2 / 2**30) < 1e-6  # float16 slice
    assert abs(row["encode_s"] - 1e9 * p.TOKENS / (1e5 * 64)) < 1e-6
    assert abs(row["search_s"] - (1e6 * 1e9 / 64 / 1e11 + 1e9 / 64 * 2048 / 1e10)) < 1e-3  # uploaded once
    one = p.project(1_000_000_000, 1, 8, rates, queries=1_000_000)
    assert not one["resident"] and one["gpu_gib"] < 1  # 238 GiB slices are streamed a block at a time
    uploads = -(-1_000_000 // p.QUERY_GROUP)
    assert abs(one["search_s"] - (1e6 * 1e9 / 8 / 1e11 + uploads * 1e9 / 8 * 2048 / 1e10)) < 1e-3
    # a GPU check from a CPU smoke run never passes for measured rates
    assert p.measured_rates({"smoke": True, "device": "cpu", "checks": []}, 1e7) is None
    check = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01", "smoke": False, "checks": [
        {"check": "encode xlmr-large (bfloat16)", "tokens_per_s": 4e5},
        {"check": "search 1,000,000 x 1024 top-100", "pairs_per_s": 2e11, "upload_gb_per_s": 12.0}]}
    measured = p.measured_rates(check, 1e7)
    assert measured.encode_tokens_per_s == 4e5 and measured.upload_bytes_per_s == 12e9
    assert measured.source.startswith("measured: NVIDIA H100")


def test_docs_show_the_projection_it_was_computed_from():
    md = (REPO / "bench" / "results" / "projection.md").read_text()
    readme = (REPO / "docs" / "scale-out.md").read_text()
    assert md in readme, "docs/scale-out.md is out of date: rerun python scripts/projection.py"
    assert "Projection, not measured" in md
