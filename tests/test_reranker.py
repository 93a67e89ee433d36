"""koret train-reranker: each loss's input shape, a real short run per loss, plain encoders get a head, errors,
and the mine -> train-reranker -> mine (rescore.model) round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import mine_config, run_cli, write_config

from koret.config import RerankerConfig


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_model, data_dir) -> Path:
    tmp = tmp_path_factory.mktemp("mined-rr")
    cfg = mine_config(tmp, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      filter__perc=0.98, search__top_k=40)
    assert run_cli("mine", "-c", str(write_config(tmp / "m.yaml", cfg)), "--quiet").exit_code == 0
    return tmp / "out" / "train.parquet"


def _cfg(train: Path | str, loss: str, **extra) -> RerankerConfig:
    return RerankerConfig.model_validate({"model": {"name": "x"}, "data": {"train": str(train), **extra},
                                         "loss": {"name": loss}})


def test_rows_are_shaped_for_each_loss(mined):
    from koret.training.crossencoder import load_reranker_data

    df = pd.read_parquet(mined)
    n, negs = len(df), 3
    shapes = {}
    for loss in ("mnrl", "cached_mnrl", "bce", "lambda", "listnet", "margin_mse"):
        d = load_reranker_data(_cfg(mined, loss)).dataset
        shapes[loss] = (d.column_names, len(d))
    assert shapes["mnrl"] == (["anchor", "positive", "negative_1", "negative_2", "negative_3"], n)
    assert shapes["bce"] == (["anchor", "passage", "label"], n * (1 + negs))
    assert shapes["lambda"] == (["query", "docs", "labels"], n) == shapes["listnet"]
    assert shapes["margin_mse"] == (["anchor", "positive", "negative_1", "negative_2", "negative_3", "label"], n)
    bce = load_reranker_data(_cfg(mined, "bce")).dataset
    assert bce["label"][:4] == [1.0, 0.0, 0.0, 0.0] and bce["passage"][0] == df["positive"][0]
    lst = load_reranker_data(_cfg(mined, "lambda")).dataset
    assert lst["docs"][0] == [df["positive"][0], *[df[f"negative_{i}"][0] for i in (1, 2, 3)]]
    assert lst["labels"][0] == [1.0, 0.0, 0.0, 0.0]
    mm = load_reranker_data(_cfg(mined, "margin_mse")).dataset
    np.testing.assert_allclose(mm["label"][0], df["scores"][0], rtol=1e-6)  # the mined teacher scores
    two = load_reranker_data(_cfg(mined, "mnrl", num_negatives=2)).dataset
    assert two.column_names == ["anchor", "positive", "negative_1", "negative_2"]


def test_bad_inputs_are_one_line(tmp_path, mined, data_dir, tiny_cross_encoder):
    df = pd.read_parquet(mined)
    df.drop(columns=["scores"]).to_parquet(tmp_path / "noscores.parquet")

    def run(cfg: dict) -> str:
        r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
        assert r.exit_code == 2, r.stdout + r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        return r.stderr

    base = {"model": {"name": str(tiny_cross_encoder)}, "args": {"output_dir": str(tmp_path / "out")}}
    assert "has no 'scores' column" in run({**base, "data": {"train": str(tmp_path / "noscores.parquet")},
                                            "loss": {"name": "margin_mse"}})
    assert "needs hard negatives" in run({**base, "data": {"train": str(data_dir / "pairs.jsonl")},
                                          "loss": {"name": "lambda"}})
    assert "data.num_negatives (9) is more than the 3" in run({**base, "data": {"train": str(mined),
                                                                                "num_negatives": 9}})
    assert "unknown key 'args.learnin_rate'" in run({**base, "data": {"train": str(mined)},
                                                     "args": {"learnin_rate": 1e-5}})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loss", ["mnrl", "cached_mnrl", "bce", "lambda", "listnet", "margin_mse"])
def test_short_run_per_loss(tmp_path, mined, tiny_cross_encoder, loss):
    from sentence_transformers import CrossEncoder

    out = tmp_path / "rr"
    cfg = {"model": {"name": str(tiny_cross_encoder), "max_length": 64}, "data": {"train": str(mined)},
           "loss": {"name": loss, **({"mini_batch_size": 4} if loss == "cached_mnrl" else {}),
                    **({"pos_weight": 3.0} if loss == "bce" else {})},
           "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 2, "learning_rate": 1e-3,
                    "logging_steps": 1, "save_strategy": "no", "warmup_steps": 0}}
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["loss"] == loss and m["steps"] == 2 and m["kind"] == "reranker"
    assert all(np.isfinite(e["loss"]) for e in m["loss_curve"]) and len(m["loss_curve"]) == 2
    pair = [("한글은 누가 만들었나?", "한글은 세종이 집현전 학자들과 함께 1443년에 창제하였다.")]
    trained = CrossEncoder(str(out / "final"), device="cpu").predict(pair)
    base = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict(pair)
    assert trained.shape == (1,) and not np.allclose(trained, base), "the weights changed"
    for name in ("training.png", "config.yaml", "final/koret.yaml"):
        assert (out / name).exists(), name


def test_plain_encoder_gets_a_one_logit_head_and_rescores_mining(tmp_path, mined, tiny_model, data_dir):
    """mine -> train-reranker (from a plain encoder) -> mine with rescore.model = the trained reranker."""
    from sentence_transformers import CrossEncoder

    plain = Path(f"{tiny_model}-bert")  # the BERT under the tiny sentence-transformer, no head
    assert (plain / "config.json").exists()
    out = tmp_path / "rr"
    cfg = {"model": {"name": str(plain)}, "data": {"train": str(mined)},
           "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 1, "save_strategy": "no"}}
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    assert CrossEncoder(str(out / "final"), device="cpu").num_labels == 1
    mcfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl", search__top_k=20,
                       rescore__model=str(out / "final"))
    r = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", mcfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    cands = pd.read_parquet(tmp_path / "out" / "candidates.parquet")
    assert "rescore_candidate_scores" in cands.columns and len(cands)


def test_run_trains_a_reranker_and_eval_reports_it(tmp_path, tiny_model, tiny_cross_encoder, data_dir):
    """koret run with a reranker section: trained after train, and eval shows base, trained and
    trained + reranker."""
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "mine": {"data": {"train": str(data_dir / "pairs.jsonl"), "corpus": str(data_dir / "corpus.txt")},
                    "teacher": {"model": str(tiny_model)}, "search": {"top_k": 30},
                    "filter": {"num_negatives": 3, "perc": 0.98}, "cache_dir": str(tmp_path / "cache")},
           "train": {"model": {"name": str(tiny_model)}, "loss": {"name": "mnrl"},
                     "args": {"per_device_train_batch_size": 16, "max_steps": 2, "save_strategy": "no"}},
           "reranker": {"model": {"name": str(tiny_cross_encoder), "max_length": 64},
                        "args": {"per_device_train_batch_size": 8, "max_steps": 2, "save_strategy": "no"}},
           "eval": {"data": {"path": str(data_dir / "pairs.jsonl")}, "k": [1, 10], "rerank_top_k": 20,
                    "cache_dir": str(tmp_path / "cache")}}
    path = write_config(tmp_path / "p.yaml", cfg)
    assert run_cli("config", "validate", "-c", str(path)).exit_code == 0
    r = run_cli("run", "-c", str(path), "--quiet")
    assert r.exit_code == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["mine", "train", "reranker", "eval"]
    assert all(s["status"] == "ran" for s in summary["stages"])
    ev = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert [m["name"] for m in ev["models"]] == ["base", "trained", "trained + reranker"]
    assert ev["models"][2]["reranks"] == "trained" and ev["models"][2]["rerank_top_k"] == 20
    rr_cfg = json.loads((tmp_path / "run" / "reranker" / "metrics.json").read_text())
    assert rr_cfg["data"] == str(tmp_path / "run" / "mine" / "train.parquet")
    # the reranker's card: text-ranking, CrossEncoder usage, training facts, retrieval vs retrieval + reranker
    import yaml

    run = tmp_path / "run"
    r = run_cli("push", "--set", f"model={run / 'reranker' / 'final'}", "--set", "repo_id=someone/ko-reranker",
                "--set", f"eval_dir={run / 'eval'}", "--dry-run", str(tmp_path / "staged"), "--quiet")
    assert r.exit_code == 0, r.stderr
    card = (tmp_path / "staged" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-ranking" and "reranker" in front["tags"]
    ndcg = next(m for m in front["model-index"][0]["results"][0]["metrics"] if m["type"] == "ndcg_at_10")
    assert ndcg["value"] == pytest.approx(ev["models"][2]["metrics"]["ndcg@10"], abs=1e-6)
    assert "CrossEncoder(" in card and "model.rank(query, passages)" in card and "SentenceTransformer(" not in card
    assert "| trained | " in card and "| trained + reranker | " in card and "reorders the top 20" in card
    assert "cross-encoder reranker fine-tuned with koret on hard negatives mined" in card
    assert (tmp_path / "staged" / "model.safetensors").exists() and (tmp_path / "staged" / "config.json").exists()


def test_held_out_reranking_is_evaluated_during_training(tmp_path, mined, tiny_cross_encoder):
    df = pd.read_parquet(mined)
    df.iloc[:20].to_parquet(tmp_path / "held.parquet")
    df.iloc[20:].to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "rr"
    cfg = {"model": {"name": str(tiny_cross_encoder)},
           "data": {"train": str(tmp_path / "train.parquet"), "eval": str(tmp_path / "held.parquet")},
           "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 2, "eval_steps": 1,
                    "save_strategy": "no"}}
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    evals = json.loads((out / "metrics.json").read_text())["eval"]
    assert len(evals) == 2 and 0 < evals[-1]["eval_ndcg@10"] <= 1, evals
