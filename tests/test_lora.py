"""Decoder embedders and LoRA: a tiny Qwen3-style decoder as teacher, student (LoRA) and reranker body;
adapter-only training, merged == adapter, eval and push of both, gradient checkpointing, resume, two processes,
and the one-line mistakes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import INSTRUCTION
from helpers import mine_config, record_training_dropout, run_cli, run_subprocess, write_config

TEXTS = ["한글은 누가 만들었나?", "김치는 영하 1도 안팎의 김치냉장고에 두면 발효가 느려져 오래 보관할 수 있다.",
         "여름 장마는 보통 언제 시작하나?"]


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_decoder_embedder, data_dir) -> Path:
    """koret mine with the decoder embedder as teacher (its instruction prompt for queries)."""
    tmp = tmp_path_factory.mktemp("mined-dec")
    cfg = mine_config(tmp, tiny_decoder_embedder, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      search__top_k=40, filter__perc=0.98)
    cfg["teacher"] = {"model": str(tiny_decoder_embedder), "batch_size": 16}  # its own prompts: 'query' / none
    result = run_cli("mine", "-c", str(write_config(tmp / "m.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "out"


def lora_config(out: Path, lm: Path, train: Path, lora: dict | None = None, **args) -> dict:
    return {"model": {"name": str(lm), "pooling": "lasttoken", "query_prompt": INSTRUCTION,
                      "lora": {"r": 4, "alpha": 8, **(lora or {})}},
            "data": {"train": str(train)},
            "loss": {"name": "cached_gist", "mini_batch_size": 4},
            "args": {"output_dir": str(out), "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                     "max_steps": 5, "logging_steps": 1, "save_steps": 5, "warmup_steps": 0, **args}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_decoder, mined) -> Path:
    """5 LoRA steps of the plain decoder (last-token pooling) with gradient checkpointing and the decoder
    teacher as GIST guide; final/ holds the merged weights and final/adapter the adapter."""
    tmp = tmp_path_factory.mktemp("lora-run")
    cfg = lora_config(tmp / "train", tiny_decoder, mined / "train.parquet", gradient_checkpointing=True)
    result = run_cli("train", "-c", str(write_config(tmp / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "train"


def _reference_embedding(folder: Path, text: str) -> np.ndarray:
    """The decoder's last hidden state at the text's last token (EOS), one text at a time (no padding), L2-normed."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0, -1].item() == tok.eos_token_id, "EOS appended"
    with torch.no_grad():
        state = model(**ids).last_hidden_state[0, -1].double().numpy()
    return state / np.linalg.norm(state)


def test_mine_with_a_decoder_teacher_scores_the_eos_state(mined, tiny_decoder_embedder):
    """Stored teacher scores are the cosines of each text's EOS state, computed alone: batches padded on the
    left, the instruction prompt on queries."""
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(tiny_decoder_embedder), device="cpu")
    assert teacher.tokenizer.padding_side == "left" and teacher[1].pooling_mode == "lasttoken"
    batch = teacher.preprocess(["가", TEXTS[1]])
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, -1] == teacher.tokenizer.eos_token_id
    cands = pd.read_parquet(mined / "candidates.parquet").head(3)
    corpus = pd.read_parquet(mined / "corpus.parquet")
    stats = json.loads((mined / "stats.json").read_text())
    assert stats["rows_out"] > 0
    for _, row in cands.iterrows():
        q = _reference_embedding(tiny_decoder_embedder, INSTRUCTION + row["query"])
        for pid, score in list(zip(row["candidate_ids"], row["teacher_candidate_scores"], strict=True))[:3]:
            p = _reference_embedding(tiny_decoder_embedder, corpus["text"][pid])
            assert score == pytest.approx(float(q @ p), abs=1e-5)


def test_lora_trains_only_the_adapter(lora_run, tiny_decoder):
    """The merged weights are the base plus the adapter's update, exactly: every other weight of the base is
    bit-identical after training, and the adapter moved."""
    from safetensors.torch import load_file

    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["gradient_checkpointing"] is True
    rec = metrics["lora"]
    assert rec["r"] == 4 and 0 < rec["trainable_parameters"] < rec["total_parameters"] / 5
    assert "layers.0.self_attn.q_proj" in rec["resolved_targets"] and "layers.1.mlp.down_proj" in rec["resolved_targets"]
    adapter = load_file(lora_run / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert sum(p.numel() for p in adapter.values()) == rec["trainable_parameters"]
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"
    base = {k.removeprefix("model."): v for k, v in load_file(tiny_decoder / "model.safetensors").items()}
    merged = load_file(lora_run / "final" / "model.safetensors")
    assert set(merged) == set(base)  # every weight of the base, none lost in the merge
    scale = 8 / 4  # alpha / r
    changed = 0
    for name, w in merged.items():
        a = next((v for k, v in adapter.items() if k.endswith(f"{name.removesuffix('.weight')}.lora_A.weight")), None)
        if a is None:
            assert torch.equal(w, base[name]), name  # not adapted: the frozen base, bit for bit
            continue
        b = adapter[[k for k in adapter if k.endswith(f"{name.removesuffix('.weight')}.lora_B.weight")][0]]
        torch.testing.assert_close(w, base[name] + scale * b @ a, atol=1e-6, rtol=0)
        changed += not torch.equal(w, base[name])
    assert changed >= 10


def test_merged_and_adapter_folders_embed_alike_with_their_prompt(lora_run, tiny_decoder):
    from sentence_transformers import SentenceTransformer

    from koret.encode import adapter_base, build_sentence_transformer, load_kwargs, load_sentence_transformer

    final = lora_run / "final"
    assert not (final / "adapter_config.json").exists() and (final / "adapter" / "adapter_config.json").exists()
    assert adapter_base(final / "adapter") == str(tiny_decoder.resolve())
    plain = SentenceTransformer(str(final), device="cpu")  # the merged weights: no adapter, no peft
    assert plain.prompts["query"] == INSTRUCTION and plain.tokenizer.padding_side == "left"
    eos = plain.tokenizer.eos_token_id
    assert plain.tokenizer("가")["input_ids"][-1] == eos, "EOS saved with the model"
    cut = SentenceTransformer(str(final), device="cpu")
    cut.max_seq_length = 16
    batch = cut.preprocess([TEXTS[1] * 10, "가"])  # a text cut at 16 tokens still ends with EOS; padding on the left
    assert batch["input_ids"].shape[1] == 16 and (batch["input_ids"][:, -1] == eos).all()
    assert batch["attention_mask"][1, 0] == 0
    merged = load_sentence_transformer(str(final), key="m", device="cpu")
    adapter = load_sentence_transformer(str(final / "adapter"), key="m", device="cpu")
    a = merged.encode(TEXTS, prompt_name="query")
    b = adapter.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(plain.encode(TEXTS), adapter.encode(TEXTS), atol=1e-5)
    # the base as the student started (last-token pooling; loaded plain it would get mean pooling and differ anyway)
    base = build_sentence_transformer(str(tiny_decoder), key="m", pooling="lasttoken", device="cpu",
                                      model_kwargs=load_kwargs("float32", "cpu"))
    assert not np.allclose(base.encode(TEXTS), plain.encode(TEXTS), atol=1e-3), "training changed the embeddings"
    # both loaders above merge the adapter: the unmerged adapter (peft's forward on the base) is the reference,
    # one text at a time (no padding), its EOS state, the instruction prompt included
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final / "adapter")
    unmerged = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_decoder), str(final / "adapter")).eval()
    for text, row in zip(TEXTS, a, strict=True):
        ids = tok(INSTRUCTION + text, return_tensors="pt")
        assert ids["input_ids"][0, -1].item() == eos
        with torch.no_grad():
            state = unmerged(**ids).last_hidden_state[0, -1].double().numpy()
        np.testing.assert_allclose(row, state / np.linalg.norm(state), atol=1e-5)


def test_eval_and_push_dry_run_of_merged_and_adapter(lora_run, data_dir, tmp_path):
    final = lora_run / "final"
    result = run_cli("eval", "--model", str(final), "--model", str(final / "adapter"), "--data",
                     str(data_dir / "pairs.jsonl"), "--k", "1,10", "--output", str(tmp_path / "eval"),
                     "--set", f"cache_dir={tmp_path}/cache", "--set", "significance.resamples=0", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]
    assert len(rows) == 2 and rows[0]["model"] != rows[1]["model"]
    assert rows[0]["metrics"]["ndcg@10"] == pytest.approx(rows[1]["metrics"]["ndcg@10"], abs=1e-6)
    for folder, weights in ((final, "model.safetensors"), (final / "adapter", "adapter_model.safetensors")):
        staged = tmp_path / f"push-{folder.name}"
        pushed = run_cli("push", "--set", f"model={folder}", "--set", "repo_id=a/b", "--dry-run", str(staged),
                         "--quiet")
        assert pushed.exit_code == 0, pushed.stderr
        files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
        assert weights in files and not any(f.startswith("adapter/") for f in files)
        card = (staged / "README.md").read_text()
        assert "| LoRA | r 4, alpha 8, dropout 0.05, all-linear" in card, card
        assert "5 |" in card and "No training record was found" not in card
    assert "merged into the weights" in (tmp_path / "push-final" / "README.md").read_text()
    assert "pip install peft" in (tmp_path / "push-adapter" / "README.md").read_text()


def test_reranker_lora_on_the_decoder_body(tmp_path, mined, tiny_decoder):
    """A causal LM reranker (yes / no logits, as Qwen3-Reranker) with LoRA: merged and adapter folders score
    alike, and the scores moved."""
    from koret.encode import load_cross_encoder

    cfg = {"model": {"name": str(tiny_decoder), "max_length": 96, "lora": {"r": 4, "merge": True}},
           "data": {"train": str(mined / "train.parquet")}, "loss": {"name": "mnrl"},
           "args": {"output_dir": str(tmp_path / "rr"), "per_device_train_batch_size": 8, "max_steps": 3,
                    "learning_rate": 5e-3, "logging_steps": 1, "save_strategy": "no", "warmup_steps": 0}}
    result = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "rr" / "metrics.json").read_text())
    assert metrics["lora"]["trainable_parameters"] < metrics["lora"]["total_parameters"] / 5
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[1])]
    final = tmp_path / "rr" / "final"
    merged = load_cross_encoder(str(final), key="m", device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    adapter = load_cross_encoder(str(final / "adapter"), key="m", device="cpu").predict(
        pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(merged, adapter, atol=1e-5)
    from sentence_transformers import CrossEncoder

    base = CrossEncoder(str(tiny_decoder), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    assert not np.allclose(base, merged, atol=1e-4)


def _student(lm: Path, settings: dict | None = None):
    from koret.config import LoraSettings
    from koret.encode import build_sentence_transformer, load_kwargs
    from koret.training.lora import wrap

    model = build_sentence_transformer(str(lm), key="m", pooling="lasttoken", device="cpu",
                                       model_kwargs=load_kwargs("float32", "cpu", "auto"), max_seq_length=64)
    wrap(model, LoraSettings(r=4, dropout=0.1, **(settings or {})))
    torch.manual_seed(0)  # lora_B starts at zero: give it values so every adapter weight gets a gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("loss_name", ["mnrl", "cached_mnrl", "cached_gist"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_decoder, mined, loss_name):
    """Checkpointing recomputes each layer in backward (the layer runs twice) and changes nothing else: the same
    loss and adapter gradients, also inside the cached (GradCache) losses."""
    from koret.config import TrainConfig
    from koret.training.biencoder import build_loss

    model = _student(tiny_decoder)
    guide = _student(tiny_decoder)
    df = pd.read_parquet(mined / "train.parquet").head(8)
    cols = ["anchor", "positive", "negative_1"]
    cfg = TrainConfig.model_validate({"loss": {"name": loss_name, "mini_batch_size": 4}})
    loss_fn = build_loss(cfg, model, guide if loss_name == "cached_gist" else None)
    calls = []
    model[0].model.get_base_model().layers[0].input_layernorm.register_forward_pre_hook(
        lambda *a: calls.append(1))

    def step() -> tuple[float, list[torch.Tensor], int]:
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same dropout masks
        loss = loss_fn([model.preprocess(df[c].tolist()) for c in cols], None)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad], len(calls)

    model.train()
    plain, grads, runs = step()
    model.gradient_checkpointing_enable()
    checked, grads_gc, runs_gc = step()
    assert checked == pytest.approx(plain, abs=1e-5)
    # the layer runs again in backward for each forward with gradients (a cached loss's first pass has none)
    assert runs_gc == (2 * runs if loss_name == "mnrl" else runs * 3 // 2), (runs, runs_gc)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, h in zip(grads, grads_gc, strict=True):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_resume_with_lora_matches_an_uninterrupted_run(tmp_path, tiny_decoder, mined):
    from safetensors.torch import load_file

    cfg = lora_config(tmp_path / "a", tiny_decoder, mined / "train.parquet", {"merge": False}, max_steps=4,
                      save_steps=2)
    cfg["loss"] = {"name": "mnrl"}
    path = write_config(tmp_path / "a.yaml", cfg)
    assert run_cli("train", "-c", str(path), "--quiet").exit_code == 0
    whole = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    for name in ("checkpoint-4", "final"):  # as if killed after step 3
        shutil.rmtree(tmp_path / "a" / name)
    resumed = run_cli("train", "-c", str(path), "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["lora"]["merge"] is False
    again = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    assert set(again) == set(whole)
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], atol=1e-5, rtol=1e-4)


def test_lora_decoder_trains_with_the_set_attention_dropout_and_saves_its_own(tmp_path, tiny_decoder, mined,
                                                                               monkeypatch):
    """model.attention_dropout applies to a decoder (its config's attention_dropout) under LoRA: the attention
    layers train with the number set; final/ (merged) and final/adapter keep the model's own (Qwen3's 0.0)."""
    import koret.train as recipe

    assert json.loads((tiny_decoder / "config.json").read_text())["attention_dropout"] == 0.0
    seen = record_training_dropout(monkeypatch, recipe)
    cfg = lora_config(tmp_path / "train", tiny_decoder, mined / "train.parquet", max_steps=2, save_steps=1)
    cfg["model"]["attention_dropout"] = 0.05
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(seen) >= 2 and all(s == (0.05, {0.05}) for s in seen), seen
    out = tmp_path / "train"
    assert json.loads((out / "metrics.json").read_text())["attention_dropout"] == 0.05
    for folder in (out / "final", out / "final" / "adapter"):
        assert json.loads((folder / "config.json").read_text())["attention_dropout"] == 0.0, folder


@pytest.mark.slow
def test_two_process_lora_run(tmp_path, tiny_decoder, mined):
    cfg = lora_config(tmp_path / "ddp", tiny_decoder, mined / "train.parquet", max_steps=2)
    cfg["loss"] = {"name": "mnrl", "gather_across_devices": True}
    result = run_subprocess("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--num-processes", "2",
                            "--quiet")
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 16 and metrics["steps"] == 2
    assert all(np.isfinite(e["loss"]) for e in metrics["loss_curve"])
    final = tmp_path / "ddp" / "final"
    from safetensors.torch import load_file

    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"
    assert (final / "model.safetensors").exists() and metrics["lora"]["trainable_parameters"] == sum(
        v.numel() for v in adapter.values())
    assert [p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith(("final", ".final"))] == ["final"]


def _expect(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_lora_mistakes_are_one_line_before_any_model_loads(tmp_path, tiny_decoder, mined, monkeypatch):
    import sys

    import koret.training.biencoder as biencoder
    import koret.training.crossencoder as crossencoder

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(biencoder, "load_student", no_load)
    monkeypatch.setattr(crossencoder, "load_reranker", no_load)
    import koret.train
    import koret.train_reranker

    monkeypatch.setattr(koret.train, "load_student", no_load)
    monkeypatch.setattr(koret.train_reranker, "load_reranker", no_load)

    def train(lm: Path, lora: dict | None = None, cmd: str = "train") -> object:
        cfg = lora_config(tmp_path / "x", lm, mined / "train.parquet", lora)
        if lora is None:
            del cfg["model"]["lora"]
        if cmd == "train-reranker":
            cfg["model"] = {"name": cfg["model"]["name"], **({"lora": cfg["model"]["lora"]} if lora is not None else {})}
            cfg["loss"] = {"name": "mnrl"}
        return run_cli(cmd, "-c", str(write_config(tmp_path / "x.yaml", cfg)), "--quiet")

    _expect(train(tiny_decoder, {"target_modules": ["q_proj", "query"]}), "model.lora.target_modules: 'query'",
            "q_proj", "down_proj")
    _expect(train(tiny_decoder, {"target_modules": ["q_norm"]}, "train-reranker"), "model.lora.target_modules",
            "Qwen3RMSNorm", "LoRA does not adapt")
    quantized = tmp_path / "quantized"  # the decoder's files with a quantization_config, as a 4-bit checkpoint has
    shutil.copytree(tiny_decoder, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    _expect(train(quantized, {}), "model.lora.merge", "quantized", "merge false")
    _expect(train(quantized, None), "model.name", "quantized", "model.lora")
    adapter_folder = tmp_path / "adapter"
    adapter_folder.mkdir()
    (adapter_folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_decoder)}))
    _expect(train(adapter_folder, {}), "model.name", "LoRA adapter folder")
    static = tmp_path / "static"  # a SentenceTransformer whose first module is no transformers model
    static.mkdir()
    (static / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "0_StaticEmbedding",
                                                      "type": "sentence_transformers.models.StaticEmbedding"}]))
    _expect(train(static, {}), "model.lora", "StaticEmbedding", "not a transformers model")
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    _expect(train(tiny_decoder, {}), "model.lora", "pip install peft")


def test_memory_lever_defaults():
    from koret.encode import resolve_attn_implementation
    from koret.training.common import default_precision
    from koret.training.lora import base_dtype, check_targets

    assert resolve_attn_implementation("auto", "cpu", "float32", True) == "sdpa"
    assert resolve_attn_implementation("auto", "cuda:0", "bfloat16", True) == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cuda:0", "bfloat16", False) == "sdpa"
    assert resolve_attn_implementation("auto", "cuda:0", "float32", True) == "sdpa"
    assert resolve_attn_implementation("eager", "cuda:0", "bfloat16", True) == "eager"
    assert default_precision({}, bf16_gpu=True) == {"bf16": True}
    assert default_precision({"fp16": True}, bf16_gpu=True) == {} and default_precision({}, bf16_gpu=False) == {}
    assert default_precision({"bf16": False}, bf16_gpu=True) == {}
    assert base_dtype("auto", lora=True, device="cpu") == "float32" == base_dtype("auto", lora=False, device="cuda:0")
    assert base_dtype("bfloat16", lora=False, device="cpu") == "bfloat16"
    named = {"layers.0.self_attn.q_proj": "Linear", "layers.0.self_attn.q_norm": "Qwen3RMSNorm"}
    check_targets(named, ["q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj"], "model.lora")
    with pytest.raises(Exception, match="'proj' is not a module"):
        check_targets(named, ["proj"], "model.lora")
