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
    trained_model = CrossEncoder(str(out / "final"), device="cpu")
    base_model = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    assert trained_model.predict(pair).shape == (1,)
    # the weights, not a saturated sigmoid of one pair, say whether training moved the model
    trained, base = trained_model.model.state_dict(), base_model.model.state_dict()
    assert trained.keys() == base.keys()
    moved = max((trained[k].float() - base[k].float()).abs().max().item() for k in trained)
    assert moved > 1e-5, f"the weights did not change (largest change {moved:g})"
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


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_model, data_dir) -> Path:
    """koret mine's folder for 20 held-out queries (the first 20 pairs), the fixture model as the retriever: its
    candidates.parquet holds each query's top 20 over the held-out positives and the extra corpus."""
    tmp = tmp_path_factory.mktemp("held-out")
    lines = (data_dir / "pairs.jsonl").read_text().splitlines()[:20]
    (tmp / "held.jsonl").write_text("\n".join(lines) + "\n")
    cfg = mine_config(tmp, tiny_model, tmp / "held.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      search__top_k=20)
    assert run_cli("mine", "-c", str(write_config(tmp / "m.yaml", cfg)), "--quiet").exit_code == 0
    return tmp / "out"


def test_held_out_reranking_is_evaluated_during_training(tmp_path, mined, held_out, tiny_cross_encoder):
    held_queries = {json.loads(x)["query"] for x in (held_out.parent / "held.jsonl").read_text().splitlines()}
    df = pd.read_parquet(mined)
    df[~df["anchor"].isin(held_queries)].to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "rr"
    cfg = {"model": {"name": str(tiny_cross_encoder)},
           "data": {"train": str(tmp_path / "train.parquet"), "eval": str(held_out)},
           "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 2, "eval_steps": 1,
                    "save_strategy": "no"}}
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    evals = json.loads((out / "metrics.json").read_text())["eval"]
    assert len(evals) == 2 and 0 < evals[-1]["eval_ndcg@10"] <= 1, evals
    # the baseline is the retriever's order of the same candidates: fixed, and not 1.0 by construction
    base = {e["eval_base_ndcg@10"] for e in evals}
    assert len(base) == 1 and 0 < base.pop() < 1, evals


def _candidate_rows(folder: Path, n: int) -> dict[str, list]:
    """The reference, from the parquet files alone: per (query, positive), the first n stored candidates (search
    order) whose text is not the text of one of the query's positives, with their teacher scores."""
    cands = pd.read_parquet(folder / "candidates.parquet")
    corpus = pd.read_parquet(folder / "corpus.parquet").set_index("id")
    text, group = corpus["text"].to_dict(), corpus["group"].to_dict()
    rows: dict[str, list] = {"anchor": [], "positive": [], "negatives": [], "scores": []}
    for _, c in cands.iterrows():
        banned = {group[p] for p in c["positive_ids"]}
        negs = [(d, s) for d, s in zip(c["candidate_ids"], c["teacher_candidate_scores"], strict=True)
                if group[d] not in banned][:n]
        if len(negs) < n:
            continue
        for p, ps in zip(c["positive_ids"], c["teacher_positive_scores"], strict=True):
            rows["anchor"].append(c["query"])
            rows["positive"].append(text[p])
            rows["negatives"].append([text[d] for d, _ in negs])
            rows["scores"].append([float(ps), *(float(s) for _, s in negs)])
    return rows


def test_candidates_parquet_trains_on_the_top_candidates_that_are_not_positives(mined):
    """candidates.parquet is a reranker source: (query, positive, its n best non-positive candidates) with the
    teacher scores as margin_mse labels; not (query_id, query) pairs."""
    from koret.training.crossencoder import load_reranker_data

    source = mined.parent / "candidates.parquet"
    ref = _candidate_rows(mined.parent, 3)
    assert len(ref["anchor"]) > 40  # the fixture's queries, minus any short of non-positive candidates
    mm = load_reranker_data(_cfg(source, "margin_mse", num_negatives=3)).dataset
    assert mm.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "label"]
    assert mm["anchor"] == ref["anchor"] and mm["positive"] == ref["positive"]
    assert [[mm[f"negative_{j}"][i] for j in (1, 2, 3)] for i in range(len(mm))] == ref["negatives"]
    np.testing.assert_allclose(np.array(mm["label"]), np.array(ref["scores"]), rtol=0, atol=0)
    assert all(s[1] >= s[2] >= s[3] for s in mm["label"])  # the top candidates, best first
    default = load_reranker_data(_cfg(source, "mnrl"))  # data.num_negatives unset: 7, mine's default
    assert default.num_negatives == 7 and default.dataset.column_names[-1] == "negative_7"
    assert default.rows == len(_candidate_rows(mined.parent, 7)["anchor"])
    # 40 negatives out of 40 candidates: only queries whose positive the search missed have that many; others drop
    every = load_reranker_data(_cfg(source, "mnrl", num_negatives=40))
    assert 0 < every.rows == len(_candidate_rows(mined.parent, 40)["anchor"]) < len(ref["anchor"])
    assert every.dataset["negative_40"] == [n[-1] for n in _candidate_rows(mined.parent, 40)["negatives"]]


def test_candidates_parquet_through_the_cli(tmp_path, mined, tiny_cross_encoder):
    out = tmp_path / "rr"
    cfg = {"model": {"name": str(tiny_cross_encoder), "max_length": 64},
           "data": {"train": str(mined.parent / "candidates.parquet"), "num_negatives": 3},
           "loss": {"name": "margin_mse"},
           "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 1, "save_strategy": "no"}}
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_negatives"] == 3 and m["train_rows"] == len(_candidate_rows(mined.parent, 3)["anchor"])
    # alone, without the corpus.parquet its ids point into: one line
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "candidates.parquet").write_bytes((mined.parent / "candidates.parquet").read_bytes())
    cfg["data"]["train"] = str(tmp_path / "alone" / "candidates.parquet")
    r = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "names passages by id and the corpus.parquet beside it is missing" in r.stderr


# ------------------------------------------------------------------------------ memory of reranker training


def _saved_attention_shapes(model, pairs) -> tuple[int, set[tuple[int, ...]]]:
    """One training-mode forward of ``pairs``: the padded length L and the shapes of every 4-d tensor the autograd
    graph keeps for the backward pass that is (batch, heads, L, L), i.e. a per-head attention matrix."""
    import torch

    model.train()
    features = model.preprocess(pairs)
    length = features["input_ids"].shape[1]
    heads = model.model.config.num_attention_heads
    kept: set[tuple[int, ...]] = set()

    def pack(t):
        if t.dim() == 4 and tuple(t.shape[1:]) == (heads, length, length):
            kept.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(features)["scores"].sum().backward()
    return length, kept


def test_reranker_attention_keeps_no_per_head_matrices(tiny_cross_encoder):
    """Training keeps no (batch, heads, L, L) attention matrices: SDPA's fused kernel runs, which on CPU needs the
    attention dropout off (model.attention_dropout: auto, 0 on CPU). With the model's own 0.1, SDPA falls back to
    its math kernel and keeps them (all-MiniLM-L6-v2, 16 pairs of 512 tokens: 9.8 GB peak RSS instead of 2.9)."""
    from koret.training.crossencoder import load_reranker

    pairs = [("한글은 누가 만들었나?", "한글은 세종이 집현전 학자들과 함께 1443년에 창제하였다."),
             ("김치를 오래 보관하는 방법은?", "김치는 영하 1도 안팎의 김치냉장고에 두면 발효가 느려져 오래 보관할 수 있다. "
                                       "장마 기간에는 습도가 높아 곰팡이가 피기 쉽다.")]
    model = load_reranker(RerankerConfig.model_validate({"model": {"name": str(tiny_cross_encoder)}}))
    assert model.model.config._attn_implementation == "sdpa"
    length, kept = _saved_attention_shapes(model, pairs)
    assert length > 20 and kept == set(), f"per-head attention matrices kept for backward: {kept}"
    assert model.model.config.attention_probs_dropout_prob == 0.0
    # the check sees them when they are there: the model's own attention dropout (0.1)
    own = load_reranker(RerankerConfig.model_validate({"model": {"name": str(tiny_cross_encoder),
                                                                 "attention_dropout": None}}))
    assert own.model.config.attention_probs_dropout_prob == pytest.approx(0.1)
    assert _saved_attention_shapes(own, pairs)[1] == {(2, 2, length, length)}


def test_auto_attention_dropout_is_zero_on_cpu_and_the_models_own_on_gpus():
    from koret.training.attention import resolve_attention_dropout

    assert resolve_attention_dropout("auto", on_gpu=False) == 0.0
    assert resolve_attention_dropout("auto", on_gpu=True) is None  # fused GPU kernels take dropout
    assert resolve_attention_dropout(None, on_gpu=False) is None and resolve_attention_dropout(0.05, True) == 0.05
    with pytest.raises(Exception, match=r"\[0, 1\)"):
        RerankerConfig.model_validate({"model": {"attention_dropout": 1.5}})


@pytest.fixture(scope="module")
def long_cross_encoder(tmp_path_factory, pairs, extra_corpus) -> Path:
    """A tiny cross-encoder whose own maximum (1028 tokens) is above koret's default pair length."""
    from koret.synth import build_random_bert

    texts = [r["query"] for r in pairs] + [r["positive"] for r in pairs] + extra_corpus
    path = build_random_bert(tmp_path_factory.mktemp("long-ce") / "bert", texts, seed=1, num_labels=1,
                             lexical=True, max_positions=1030)
    return path


def test_pairs_are_cut_at_512_and_batches_padded_to_their_longest_pair(tmp_path, monkeypatch, pairs,
                                                                       long_cross_encoder):
    """model.max_length unset: pairs are cut at 512 tokens (not at the model's 1028), and each batch the loss
    tokenizes during training is as wide as its longest pair (cut at 512), not as the maximum."""
    import torch

    import koret.train_reranker as tr

    texts = [r["positive"] for r in pairs]
    rows = [{"anchor": pairs[i]["query"], "positive": texts[i], "negative_1": texts[i + 20],
             "negative_2": texts[i + 40], "negative_3": " ".join([texts[i + 60]] * 40)} for i in range(8)]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    calls: list[tuple[list, int]] = []
    load = tr.load_reranker

    def recording_load(cfg):
        model = load(cfg)
        preprocess = model.preprocess

        def record(inputs, *args, **kwargs):
            out = preprocess(inputs, *args, **kwargs)  # also called on columns of texts for the model card
            if torch.is_grad_enabled() and all(isinstance(p, tuple | list) and len(p) == 2 for p in inputs):
                calls.append(([tuple(p) for p in inputs], out["input_ids"].shape[1]))  # a loss's batch of pairs
            return out

        model.preprocess = record
        return model

    monkeypatch.setattr(tr, "load_reranker", recording_load)
    cfg = RerankerConfig.model_validate({
        "model": {"name": str(long_cross_encoder)}, "data": {"train": str(tmp_path / "train.parquet")},
        "args": {"output_dir": str(tmp_path / "rr"), "per_device_train_batch_size": 4, "max_steps": 1,
                 "save_steps": 1, "logging_steps": 1}})
    metrics = tr.train_reranker(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(long_cross_encoder))
    assert tok.model_max_length == 1028
    assert len(calls) == 8  # the positive, 4 in-batch negatives and 3 hard negatives of the 4 queries
    widths = []
    for batch, width in calls:
        longest = max(len(tok(q, p)["input_ids"]) for q, p in batch)
        widths.append(width)
        assert width == min(512, longest), (width, longest)
    assert 512 in widths and min(widths) < 100  # the long hard negatives are cut; short batches stay short
    assert metrics["max_length"] == 512 and metrics["attn_implementation"] == "sdpa"  # what metrics.json records
    assert metrics["attention_dropout"] == 0.0  # trained without it (CPU) ...
    for folder in ("final", "checkpoint-1"):  # ... saved with the model's own
        saved = json.loads((tmp_path / "rr" / folder / "config.json").read_text())
        assert saved["attention_probs_dropout_prob"] == pytest.approx(0.1), folder


def test_in_training_eval_reranks_the_retrievers_candidates_aligned(tmp_path, held_out, tiny_cross_encoder):
    """The evaluator of train-reranker reorders each held-out query's retrieved candidates (candidates.parquet),
    with every score on its own passage also where a query has fewer candidates (the old evaluator sliced scores
    by position and paired them with the wrong texts there); its base_* figures are the retriever's order.
    Checked against pytrec_eval on runs built here from the files and the cross-encoder."""
    import shutil

    import pytrec_eval
    import torch
    from sentence_transformers import CrossEncoder

    from koret.training.crossencoder import reranking_evaluator

    folder = tmp_path / "held"
    shutil.copytree(held_out, folder)
    cands = pd.read_parquet(folder / "candidates.parquet")
    cands.at[1, "candidate_ids"] = cands.at[1, "candidate_ids"][:14]  # the retriever returned 14, not 20
    cands.at[1, "teacher_candidate_scores"] = cands.at[1, "teacher_candidate_scores"][:14]
    cands.to_parquet(folder / "candidates.parquet")

    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    with torch.no_grad():  # logits of 0.4-0.9: sigmoid scores apart by more than float32 steps (see test_evaluate)
        ce.model.classifier.weight.mul_(0.1)
        ce.model.classifier.bias.mul_(0.1)
    cfg = RerankerConfig.model_validate({"model": {"name": "x"}, "data": {"train": "x", "eval": str(folder /
                                                                                                   "train.parquet")}})
    got = reranking_evaluator(cfg)(ce)

    corpus = pd.read_parquet(folder / "corpus.parquet")
    doc_id, text = corpus["doc_id"].tolist(), corpus["text"].tolist()
    pairs = [(row.query, text[i]) for row in cands.itertuples() for i in row.candidate_ids]
    ce_scores = iter(ce.predict(pairs).tolist())
    qrels, base_run, rr_run = {}, {}, {}
    ambiguous = 0  # queries where float noise could order a positive and another passage either way
    for q, row in enumerate(cands.itertuples()):
        qrels[str(q)] = {doc_id[i]: 1 for i in row.positive_ids}
        base_run[str(q)] = {doc_id[i]: float(s) for i, s in zip(row.candidate_ids, row.teacher_candidate_scores,
                                                                   strict=True)}
        rr_run[str(q)] = {doc_id[i]: next(ce_scores) for i in row.candidate_ids}
        ranked = sorted(rr_run[str(q)].items(), key=lambda x: -x[1])
        ambiguous += any(a[1] - b[1] < 1e-5 and (a[0] in qrels[str(q)]) != (b[0] in qrels[str(q)])
                         for a, b in zip(ranked[:-1], ranked[1:], strict=True))
    assert len(cands) == 19 and len(rr_run["1"]) == 14  # 20 pairs, one query with two positives
    assert ambiguous <= 2, ambiguous

    def top10(run: dict) -> dict:  # trec_eval's order (score, then doc id descending), cut at 10: for mrr@10
        return {q: dict(sorted(r.items(), key=lambda x: (-x[1], [-ord(c) for c in x[0]]))[:10])
                for q, r in run.items()}

    for prefix, run in (("eval_base_", base_run), ("eval_", rr_run)):
        ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map_cut.10", "recall.10"}).evaluate(run)
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10(run))
        for ours, theirs, values in (("ndcg@10", "ndcg_cut_10", ref), ("map@10", "map_cut_10", ref),
                                     ("recall@10", "recall_10", ref), ("mrr@10", "recip_rank", rr)):
            want = np.mean([v[theirs] for v in values.values()])
            assert got[prefix + ours] == pytest.approx(want, abs=1e-6 + ambiguous / len(cands)), prefix + ours
    assert got["eval_base_ndcg@10"] < 1, "the retriever's order, not 1.0 by construction"
    assert got["eval_ndcg@10"] != got["eval_base_ndcg@10"]

    from koret.errors import KoretError

    cfg.data.eval = str(tmp_path / "plain.parquet")  # a train.parquet alone: no retrieved candidates to rerank
    pd.read_parquet(folder / "train.parquet").to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(KoretError, match="no candidates.parquet and corpus.parquet"):
        reranking_evaluator(cfg)


def test_run_reranks_the_trained_retriever_when_eval_models_have_no_labels(tmp_path):
    """koret run: the reranker reorders the trained retriever's ranking, whatever the order and labels of
    eval.models (unlabelled, koret eval names a model by its folder: train/final)."""
    from koret.config import EvalConfig
    from koret.stages import _chain_eval

    root = tmp_path / "run"
    trained = str(root / "train" / "final")
    out = {"reranker": RerankerConfig.model_validate({"model": {"name": "x"}})}

    def target(models: list[dict]) -> str | None:
        section = EvalConfig.model_validate({"data": {"path": "x"}, "models": models})
        return _chain_eval(section, out, root, "p.yaml").rerank_model

    assert target([{"name": "org/base-model"}, {"name": trained}]) == "train/final"
    assert target([{"name": trained}, {"name": "org/base-model"}]) == "train/final"
    assert target([{"name": "org/base", "label": "b"}, {"name": trained, "label": "t"}]) == "t"
    assert target([{"name": "org/base"}, {"name": "runs/elsewhere"}]) == "elsewhere"  # else the last model


def test_negative_columns_in_any_file_order_are_read_in_rank_order(tmp_path, mined):
    """Both trainers read negative_1..N by their number, whatever the file's column order (the listwise reranker
    rows took them in file order: negative_10 before negative_2 in a file written that way)."""
    from koret.training.common import negative_columns
    from koret.training.crossencoder import load_reranker_data

    assert negative_columns(["anchor", "negative_10", "positive", "negative_2", "negative", "negative_1", "x"]) == [
        "negative", "negative_1", "negative_2", "negative_10"]
    df = pd.read_parquet(mined)
    shuffled = tmp_path / "shuffled.parquet"
    df[["negative_3", "anchor", "negative_1", "positive", "negative_2", "scores"]].to_parquet(shuffled)
    lst = load_reranker_data(_cfg(shuffled, "lambda")).dataset
    assert lst["docs"][0] == [df["positive"][0], *[df[f"negative_{i}"][0] for i in (1, 2, 3)]]


def test_margin_mse_labels_are_logits(tmp_path, mined):
    """The reranker's margin_mse fits logit margins: a cross-encoder's sigmoid scores are read back as logits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from koret.training.crossencoder import load_reranker_data

    df = pd.read_parquet(mined)
    probs = [np.array([0.9, 0.5, 0.2, 0.1][: 1 + 3], np.float32) for _ in range(len(df))]
    df["scores"] = probs
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(
        {b"koret.score_kind": b"cross_encoder_sigmoid"})
    pq.write_table(table, tmp_path / "train.parquet")
    labels = load_reranker_data(_cfg(tmp_path / "train.parquet", "margin_mse")).dataset["label"][0]
    np.testing.assert_allclose(labels, np.log(probs[0] / (1 - probs[0])), rtol=1e-5)


def test_in_training_eval_reranks_only_what_the_retriever_retrieved(tmp_path, held_out):
    """With search.lexical the mined candidates are dense + BM25: the in-training eval keeps only the dense ones
    (the retriever's top-k, as koret eval --reranker sees it), not the passages BM25 alone added."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from koret.training.crossencoder import read_held_out

    folder = tmp_path / "lex"
    shutil.copytree(held_out, folder)
    table = pq.read_table(folder / "candidates.parquet")
    ids = table.column("candidate_ids").to_pylist()
    sources = [["lexical" if j % 3 == 2 else ("both" if j % 3 == 1 else "dense") for j in range(len(row))]
               for row in ids]
    pq.write_table(table.append_column("candidate_sources", pa.array(sources, type=pa.list_(pa.string()))),
                   folder / "candidates.parquet")
    cfg = RerankerConfig.model_validate({"model": {"name": "x"}, "data": {"train": "t", "eval": str(folder)}})
    held = read_held_out(cfg)
    got = [sorted(held.passage_ids[row[row >= 0]].tolist()) for row in held.candidates]
    want = [sorted(c for j, c in enumerate(row) if j % 3 != 2) for row in ids]
    assert got == want
