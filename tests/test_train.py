"""koret train: a real short run, GIST == cached GIST, 2 processes, resume, Matryoshka, attention dropout, bad
inputs."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import mine_config, record_training_dropout, run_cli, run_subprocess, write_config


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_model, data_dir) -> Path:
    """A mined train.parquet (3 negatives) from the fixture data, with its config.yaml beside it."""
    tmp = tmp_path_factory.mktemp("mined")
    cfg = mine_config(tmp, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      filter__perc=0.98, search__top_k=40)
    result = run_cli("mine", "-c", str(write_config(tmp / "m.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "out"


def train_config(tmp: Path, model: Path, train: Path | str, **args) -> dict:
    return {
        "model": {"name": str(model), "query_prompt_name": "query", "passage_prompt_name": "passage"},
        "data": {"train": str(train)},
        "loss": {"name": "cached_gist", "mini_batch_size": 8},
        "args": {"output_dir": str(tmp / "train"), "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                 "logging_steps": 1, "save_steps": 4, "num_train_epochs": 1, "warmup_steps": 0, **args},
    }


def _train(tmp: Path, cfg: dict, *extra: str):
    return run_cli("train", "-c", str(write_config(tmp / "t.yaml", cfg)), "--quiet", *extra)


def test_short_run_learns_saves_and_keeps_prompts(tmp_path, tiny_model, mined, data_dir):
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", num_train_epochs=2)
    cfg["data"]["eval"] = str(data_dir / "pairs.jsonl")
    cfg["data"]["eval_max_queries"] = 40
    result = _train(tmp_path, cfg)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["loss_curve"]]
    assert len(losses) >= 6
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert metrics["num_negatives"] == 3 and metrics["world_size"] == 1 and metrics["global_batch_size"] == 16
    assert metrics["guide"].startswith("teacher: ") and metrics["samples_per_second"] > 0
    assert metrics["tokens_per_second"] > 0 and metrics["peak_rss_bytes"] > 0
    assert metrics["eval"] and "eval_cosine_ndcg@10" in metrics["eval"][-1]
    for name in ("training.png", "config.yaml", "final/model.safetensors", "final/koret.yaml"):
        assert (out / name).exists(), name
    assert list(out.glob("checkpoint-*"))

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out / "final"), device="cpu")
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
    emb = model.encode(["한글은 누가 만들었나?"], prompt_name="query")
    assert emb.shape == (1, 64) and np.isfinite(emb).all()
    before = SentenceTransformer(str(tiny_model), device="cpu").encode(["한글은 누가 만들었나?"], prompt_name="query")
    assert not np.allclose(emb, before), "the weights changed"


def test_gist_and_cached_gist_agree_on_a_batch(tiny_model, mined):
    from sentence_transformers import SentenceTransformer

    from koret.config import TrainConfig
    from koret.training.biencoder import build_loss

    model = SentenceTransformer(str(tiny_model), device="cpu")
    guide = SentenceTransformer(str(tiny_model), device="cpu")
    df = pd.read_parquet(mined / "train.parquet").head(12)
    cols = ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert all(c in df.columns for c in cols)

    def features():
        return [model.preprocess(df[c].tolist()) for c in cols]

    def loss(name):
        cfg = TrainConfig.model_validate({"loss": {"name": name, "mini_batch_size": 4, "margin": 0.05}})
        return build_loss(cfg, model, guide)(features(), None).item()

    plain, cached = loss("gist"), loss("cached_gist")
    assert plain == pytest.approx(cached, rel=1e-4, abs=1e-5)
    assert plain != pytest.approx(loss("mnrl"), rel=1e-3), "the guide matters"


@pytest.mark.slow
def test_two_process_data_parallel_run(tmp_path, tiny_model, mined):
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", per_device_train_batch_size=8)
    cfg["loss"].update({"gather_across_devices": True, "mini_batch_size": 4})
    path = write_config(tmp_path / "t.yaml", cfg)
    result = run_subprocess("train", "-c", str(path), "--num-processes", "2", "--quiet")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 16
    assert all(np.isfinite(e["loss"]) for e in metrics["loss_curve"])
    assert [p.name for p in out.iterdir() if p.name.startswith("final")] == ["final"], "saved once"


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_model, mined):
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", save_steps=3, num_train_epochs=2)
    path = write_config(tmp_path / "t.yaml", cfg)
    killed = run_subprocess("train", "-c", str(path), "--quiet", env={"KORET_FAULT_AFTER_STEPS": "4"})
    assert killed.returncode == -9
    assert (tmp_path / "train" / "checkpoint-3").exists() and not (tmp_path / "train" / "final").exists()
    resumed = run_subprocess("train", "-c", str(path), "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-3")

    ref_cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", save_steps=3, num_train_epochs=2,
                           output_dir=str(tmp_path / "ref"))
    assert _train(tmp_path, ref_cfg).exit_code == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "train" / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_matryoshka_dims(tmp_path, tiny_model, mined):
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet")
    cfg["loss"] = {"name": "mnrl", "matryoshka_dims": [64, 32, 16]}
    result = _train(tmp_path, cfg)
    assert result.exit_code == 0, result.stderr
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tmp_path / "train" / "final"), device="cpu", truncate_dim=16)
    assert model.encode(["김치"]).shape == (1, 16)
    cfg["loss"]["matryoshka_dims"] = [128]
    bad = _train(tmp_path, cfg)
    assert bad.exit_code == 2 and "loss.matryoshka_dims" in bad.stderr


def _expect(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_bad_train_inputs(tmp_path, tiny_model, mined):
    df = pd.read_parquet(mined / "train.parquet")
    df.drop(columns=["positive"]).to_parquet(tmp_path / "nopos.parquet")
    _expect(_train(tmp_path, train_config(tmp_path, tiny_model, tmp_path / "nopos.parquet")),
            "column 'positive' not found", "anchor, negative_1")

    varying = df.copy()
    varying.loc[varying.index[:2], "negative_3"] = None
    varying.to_parquet(tmp_path / "varying.parquet")
    _expect(_train(tmp_path, train_config(tmp_path, tiny_model, tmp_path / "varying.parquet")),
            "varying negative counts", "negative_3")

    df.head(0).to_parquet(tmp_path / "empty.parquet")
    _expect(_train(tmp_path, train_config(tmp_path, tiny_model, tmp_path / "empty.parquet")), "empty dataset")

    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet")
    cfg["loss"]["guide"] = str(tmp_path / "no-guide")
    _expect(_train(tmp_path, cfg), "loss.guide: model folder not found")

    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet")
    cfg["loss"]["margin"] = -0.1
    _expect(_train(tmp_path, cfg), "loss.margin: must be >= 0")

    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet")
    cfg["loss"]["mini_batch_size"] = 64
    _expect(_train(tmp_path, cfg), "loss.mini_batch_size (64) is larger than the batch")

    pairs_only = tmp_path / "pairs.parquet"
    df[["anchor", "positive"]].to_parquet(pairs_only)  # no koret mine config.yaml beside it
    cfg = train_config(tmp_path, tiny_model, pairs_only)
    cfg["loss"] = {"name": "gist", "guide": "teacher"}
    _expect(_train(tmp_path, cfg), "loss.guide: 'teacher' requested", "no guide is available")

    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", learnig_rate=1e-4)
    _expect(_train(tmp_path, cfg), "unknown key 'args.learnig_rate'", "did you mean 'args.learning_rate'")
    assert not (tmp_path / "train" / "final").exists()


def test_progress_off_a_terminal_is_plain_lines_at_a_steady_pace(tmp_path, tiny_model, mined):
    """stderr to a file (nohup, SLURM, CI): every logging step of training is a line with step/total, loss, rate
    and ETA; other long phases write a line at least every KORET_LOG_INTERVAL seconds."""
    import re

    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", logging_steps=2, max_steps=6)
    path = write_config(tmp_path / "t.yaml", cfg)
    log = tmp_path / "train.log"
    import os
    import subprocess
    import sys

    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-m", "koret", "train", "-c", str(path)], stdout=fh, stderr=fh, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "KORET_LOG_INTERVAL": "0"}, timeout=600)
    text = log.read_text()
    steps = re.findall(r"^train: (\d)/6 \(\d+%\), loss (\d+\.\d{4}), [\d.e+-]+ steps/s, elapsed \d:\d\d:\d\d, "
                       r"ETA \d:\d\d:\d\d$", text, flags=re.M)
    assert [int(s) for s, _ in steps] == [2, 4, 6], text[-3000:]
    assert "\x1b[" not in text, "no terminal control codes in a log file"


# ------------------------------------------------------------------------------------ attention dropout


@pytest.mark.parametrize(("setting", "trained"), [("default", 0.0), (0.05, 0.05), (None, 0.1)])
def test_attention_dropout_while_training_and_the_models_own_in_saves(tmp_path, tiny_model, mined, monkeypatch,
                                                                       setting, trained):
    """model.attention_dropout: auto (the default) trains without attention dropout on CPU (where SDPA's fused
    kernel takes none; with BERT's 0.1 it keeps every head's L x L matrices for backward), a number sets it, null
    keeps the model's own (0.1). Checkpoints and final/ are saved with the model's own value; metrics.json
    records the one trained with."""
    import koret.train as recipe

    own = json.loads((tiny_model / "config.json").read_text())["attention_probs_dropout_prob"]
    assert own == 0.1
    seen = record_training_dropout(monkeypatch, recipe)
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet", max_steps=2, save_steps=1)
    if setting != "default":
        cfg["model"]["attention_dropout"] = setting
    result = _train(tmp_path, cfg)
    assert result.exit_code == 0, result.stderr
    assert len(seen) >= 2 and all(s == (trained, {trained}) for s in seen), seen
    out = tmp_path / "train"
    assert json.loads((out / "metrics.json").read_text())["attention_dropout"] == trained
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for folder in (out / "final", *checkpoints):
        saved = json.loads((folder / "config.json").read_text())
        assert saved["attention_probs_dropout_prob"] == own, folder.name
        assert "attention_dropout" not in saved, "no key the model's config does not have"


@pytest.mark.parametrize(("setting", "overrides"), [("auto", {}), (None, {}),
                                                    (0.05, {"attention_probs_dropout_prob": 0.05})])
def test_attention_dropout_on_a_gpu_keeps_the_models_own_under_auto(tiny_model, monkeypatch, setting, overrides):
    """On a GPU (mocked: no weights are loaded), auto and null load the student with its own dropout (the fused
    GPU kernels take it); a number still overrides it."""
    import koret.training.biencoder as biencoder
    from koret.config import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loads = []

    def fake_load(name, **kwargs):
        loads.append(kwargs)
        return types.SimpleNamespace()

    monkeypatch.setattr(biencoder, "load_sentence_transformer", fake_load)
    cfg = TrainConfig.model_validate({"model": {"name": str(tiny_model), "attention_dropout": setting},
                                      "data": {"train": "unused.parquet"}, "loss": {"name": "mnrl"}})
    student = biencoder.load_student(cfg)
    assert loads[0]["device"] == "cuda:0"
    assert (loads[0]["config_kwargs"] or {}) == overrides
    assert student.koret_own_dropout == ({"attention_probs_dropout_prob": 0.1} if overrides else {})


# ------------------------------------------------------------------------------------ smaller defects (#9.8)


def test_loss_defaults_follow_the_library(tiny_model):
    from sentence_transformers import SentenceTransformer

    from koret.config import TrainConfig
    from koret.training.biencoder import build_loss

    model = SentenceTransformer(str(tiny_model), device="cpu")

    def loss(**lc):
        return build_loss(TrainConfig.model_validate({"loss": lc}), model, model)

    assert loss(name="mnrl").scale == 20.0, "MNRL keeps its own scale (temperature 0.05)"
    assert loss(name="cached_mnrl", mini_batch_size=4).scale == 20.0
    assert loss(name="cached_gist").temperature == 0.01 and loss(name="gist").temperature == 0.01
    assert loss(name="mnrl", temperature=0.02).scale == 50.0
    mat = loss(name="mnrl", matryoshka_dims=[32, 16])
    assert list(mat.matryoshka_dims) == [64, 32, 16], "the full dimension is always trained"


def test_stack_features_refuses_unpadded_batches():
    from koret.errors import KoretError
    from koret.training.biencoder import stack_features

    padded = [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
               "guide:input_ids": torch.ones(2, 5, dtype=torch.long)},
              {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
               "guide:input_ids": torch.ones(2, 2, dtype=torch.long)}]
    out = stack_features(padded, pad_id=0)
    assert out["input_ids"].shape == (4, 4) and out["guide:input_ids"].shape == (4, 5)
    assert out["attention_mask"][:2, 3].tolist() == [0, 0]
    flat = [{"input_ids": torch.ones(1, 5, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 2, 5])}] * 2
    with pytest.raises(KoretError, match="unpadded"):
        stack_features(flat, pad_id=0)


def test_holdout_splits_by_anchor():
    from datasets import Dataset

    from koret.training.biencoder import split_by_anchor

    anchors = [f"q{i // 3}" for i in range(60)]  # 20 anchors, 3 rows each
    ds = Dataset.from_dict({"anchor": anchors, "positive": [f"p{i}" for i in range(60)]})
    train, held = split_by_anchor(ds, 0.2, seed=1)
    assert len(train) + len(held) == 60 and len(set(held["anchor"])) == 4 and len(held) == 12
    assert not set(train["anchor"]) & set(held["anchor"])


def test_resume_from_checkpoint_path_is_used(tmp_path):
    from koret.errors import KoretError
    from koret.training.common import resume_checkpoint

    out = tmp_path / "out"
    for step in (3, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / "checkpoint-6" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert resume_checkpoint(str(out / "checkpoint-3"), False, out) == str(out / "checkpoint-3")
    assert resume_checkpoint(True, False, out).endswith("checkpoint-6")
    assert resume_checkpoint(None, True, out).endswith("checkpoint-6")
    assert resume_checkpoint(None, False, out) is None
    with pytest.raises(KoretError, match="args.resume_from_checkpoint: .* is not a checkpoint folder"):
        resume_checkpoint(str(tmp_path / "nope"), False, out)


def test_requires_sentence_transformers_6_2():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    st = next(Requirement(r) for r in requires("koret") if r.startswith("sentence-transformers"))
    assert not st.specifier.contains("6.1.9") and st.specifier.contains("6.2.0")


def test_short_no_duplicate_batches_reach_every_process_equally():
    """Rows sharing hard negatives make no_duplicates yield short batches; under 2 processes accelerate used to
    drop every round whose last batch was short (a 6-step epoch ended after 1 step)."""
    from accelerate.data_loader import BatchSamplerShard
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from koret.training.common import VariableSizeBatches

    negatives = [f"공통 음성 문단 {i}" for i in range(6)]  # every row draws from six shared negatives
    ds = Dataset.from_dict({"anchor": [f"질문 {i}" for i in range(120)], "positive": [f"문단 {i}" for i in range(120)],
                            "negative_1": [negatives[i % 6] for i in range(120)]})
    plain = BatchSamplerShard(NoDuplicatesBatchSampler(ds, batch_size=16, drop_last=True, seed=0), 2, 0,
                              even_batches=False)
    assert len(list(plain)) < len(plain), "the failure this guards against"
    def sampler():  # every process builds the same seeded sampler, as the trainer does
        return NoDuplicatesBatchSampler(ds, batch_size=16, drop_last=False, seed=0, generator=torch.Generator())

    shards = [list(BatchSamplerShard(VariableSizeBatches(sampler(), 2), 2, r, even_batches=False)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4  # len(sampler) 8 batches -> 4 per process, on both
    assert all(b for s in shards for b in s)
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]], "equal shapes for gathers across ranks"
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)), "no row twice within the epoch's batches"
