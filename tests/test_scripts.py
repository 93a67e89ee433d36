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
    assert set(checks) == {"encode bert-base", "search 5,000", "koret train", "accelerate launch"}
    assert checks["encode bert-base"]["tokens_per_s"] > 0
    assert checks["search 5,000"]["recall@10_vs_fp32"] == 1.0
    assert checks["search 5,000"]["ids_equal_fp64"] and checks["search 5,000"]["scores_exact"]
    run = checks["accelerate launch"]
    assert run["stages"] == ["ran", "ran", "ran"] and run["stored_scores_exact_fp32"], run
    assert checks["koret train"]["steps_per_s"] > 0
    assert "tokens/s" in result.stdout and "steps/s" in result.stdout


def test_readme_shows_the_quality_study_as_measured():
    """The README's quality table is bench/results/quality.md, written by make quality, line for line."""
    md = REPO / "bench" / "results" / "quality.md"
    data = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    readme = (REPO / "README.md").read_text()
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) >= 4 and all(line in readme for line in rows), "README is out of date: rerun make quality"
    base = next(a for a in data["arms"] if a["arm"] == "base")
    assert f"| base | {base['what']} | {base['metrics']['ndcg@10'] * 100:.2f} |" in readme
    for arm in data["arms"]:
        if "vs_base" in arm:
            s = arm["vs_base"]["ndcg@10"]
            assert s["ci_low"] <= s["delta"] <= s["ci_high"]
