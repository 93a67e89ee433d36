"""koret run with a suite of test sets: the eval stage evaluates every set and their macro average, the summary's
figure is the average's, and the pushed card has a table per set and the average, a model-index entry per set."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import run_cli, write_config


def test_run_eval_and_card_use_the_suite(tmp_path, tiny_model, pairs):
    import torch
    from sentence_transformers import SentenceTransformer

    trained = tmp_path / "trained"
    other = SentenceTransformer(str(tiny_model), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other.save(str(trained))
    sets = {}
    for name, rows in (("alpha", pairs[:20]), ("beta", pairs[30:50])):
        sets[name] = tmp_path / f"{name}.jsonl"
        sets[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "eval": {"sets": [{"name": n, "path": str(p)} for n, p in sets.items()], "k": [1, 10],
                    "models": [{"name": str(tiny_model), "label": "base"}, {"name": str(trained), "label": "trained"}],
                    "significance": {"resamples": 500}, "cache_dir": str(tmp_path / "cache")},
           "push": {"model": str(trained), "repo_id": "someone/koret-suite", "license": "apache-2.0",
                    "dry_run": True}}
    r = run_cli("run", "-c", str(write_config(tmp_path / "run.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    run = tmp_path / "run"
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(ev["sets"]) == ["alpha", "beta"] and ev["data"]["format"] == "suite"
    for i in (0, 1):
        per_set = [ev["sets"][n]["models"][i]["metrics"]["ndcg@10"] for n in ("alpha", "beta")]
        assert ev["models"][i]["metrics"]["ndcg@10"] == pytest.approx(sum(per_set) / 2, abs=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    figure = next(s["figure"] for s in summary["stages"] if s["stage"] == "eval")
    a, b = (m["metrics"]["ndcg@10"] for m in ev["models"])
    assert figure == f"NDCG@10 {a:.4f} -> {b:.4f} ({b - a:+.4f}) (average of 2 sets)"

    card = (run / "push" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    results = front["model-index"][0]["results"]
    assert [x["dataset"]["name"] for x in results] == ["alpha", "beta"], "a model-index entry per set"
    for x, name in zip(results, ("alpha", "beta"), strict=True):
        ndcg = next(m["value"] for m in x["metrics"] if m["type"] == "ndcg_at_10")
        assert ndcg == pytest.approx(ev["sets"][name]["models"][1]["metrics"]["ndcg@10"], abs=1e-6)
    assert card.index("### alpha") < card.index("### beta") < card.index("### average")
    assert "2 test sets" in card and f"{b:.4f} ({b - a:+.4f}" in card
