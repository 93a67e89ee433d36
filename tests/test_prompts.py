"""One rule for prompts in every stage; the trained model keeps exactly its training prompts; the guide scores
texts the way the teacher did in mining."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import mine_config, run_cli, write_config

from koret.errors import KoretError
from koret.prompts import resolve_prompt, resolve_prompts, saved_prompts

PROMPTS = {"query": "query: ", "passage": "passage: ", "qa": "질문: "}


def test_the_rule_on_a_prompt_dictionary():
    # a name must exist; a text is used as written; neither: query / document, else passage
    assert resolve_prompt(PROMPTS, None, "qa", ("query",), "m.query") == "질문: "
    assert resolve_prompt(PROMPTS, "passage", None, ("document", "passage"), "m.passage") == "passage"
    assert resolve_prompt(PROMPTS, "", None, ("query",), "m.query") == ""
    assert resolve_prompt(PROMPTS, None, None, ("document", "passage"), "m.passage") == "passage: "
    assert resolve_prompt({**PROMPTS, "document": "doc: "}, None, None, ("document", "passage"), "x") == "doc: "
    assert resolve_prompt({}, None, None, ("query",), "m.query") == ""
    with pytest.raises(KoretError, match=r"m.passage_prompt_name: 'document' is not a prompt of this model "
                                         r"\(its prompts: 'query', 'passage', 'qa'\)"):
        resolve_prompt(PROMPTS, None, "document", ("document",), "m.passage")
    with pytest.raises(KoretError, match="both set"):
        resolve_prompt(PROMPTS, "a", "qa", ("query",), "m.query")
    assert resolve_prompts(PROMPTS, None, "m") == ("query: ", "passage: ")
    assert saved_prompts("query: ", "") == {"query": "query: "} and saved_prompts("", "") == {}


def test_mine_defaults_to_the_teachers_own_prompts(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl")
    cfg["teacher"] = {"model": str(tiny_model), "batch_size": 16}
    r = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    teacher = json.loads((tmp_path / "out" / "stats.json").read_text())["teacher"]
    assert teacher["query_prompt"] == "query: " and teacher["passage_prompt"] == "passage: "


def test_a_prompt_name_the_model_lacks_is_a_one_line_error(tmp_path, tiny_model, data_dir):
    cfg = mine_config(tmp_path, tiny_model, data_dir / "pairs.jsonl")
    cfg["teacher"] = {"model": str(tiny_model), "passage_prompt_name": "doc"}
    r = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "error: teacher.passage_prompt_name: 'doc' is not a prompt of this model (its prompts: 'query', "
        "'document', 'passage') (use one of them, or give the text with passage_prompt)"]
    assert not (tmp_path / "out").exists()
    both = run_cli("config", "validate", "--stage", "mine", "-c", str(write_config(tmp_path / "b.yaml", {
        "teacher": {"model": "x", "query_prompt": "q: ", "query_prompt_name": "query"}})))
    assert both.exit_code == 2 and "query_prompt and query_prompt_name are both set" in both.stderr


def test_trained_model_saves_exactly_the_prompts_it_was_trained_with(tmp_path, tiny_model, data_dir):
    from sentence_transformers import SentenceTransformer

    cfg = {"model": {"name": str(tiny_model), "query_prompt": "", "passage_prompt": ""},
           "data": {"train": str(data_dir / "pairs.jsonl"), "limit": 16},
           "loss": {"name": "mnrl"},
           "args": {"output_dir": str(tmp_path / "train"), "per_device_train_batch_size": 8, "max_steps": 1,
                    "save_strategy": "no", "warmup_steps": 0}}
    r = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert r.exit_code == 0, r.stderr
    trained = SentenceTransformer(str(tmp_path / "train" / "final"), device="cpu")
    def non_empty(model):  # sentence-transformers adds empty 'query' / 'document' entries itself
        return {k: v for k, v in model.prompts.items() if v}

    assert non_empty(trained) == {} and non_empty(SentenceTransformer(str(tiny_model), device="cpu"))
    cfg["model"] = {"name": str(tiny_model), "query_prompt": "질문: "}  # passage side: the model's own
    cfg["args"]["output_dir"] = str(tmp_path / "train2")
    assert run_cli("train", "-c", str(write_config(tmp_path / "t2.yaml", cfg)), "--quiet").exit_code == 0
    again = SentenceTransformer(str(tmp_path / "train2" / "final"), device="cpu")
    assert non_empty(again) == {"query": "질문: ", "document": "passage: "}


def test_guide_scores_in_batch_texts_exactly_as_the_teacher(tmp_path, tiny_model, pairs):
    """Student without prompts and a long max length; teacher with its prompts, max length 12: the guide's
    in-batch embeddings equal what the teacher's encode gives for the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.data_collator import BaseDataCollator

    from koret.training.biencoder import Guide, GuideCollator, guide_module_class

    student = SentenceTransformer(str(tiny_model), device="cpu")
    student.prompts = {}
    teacher = SentenceTransformer(str(tiny_model), device="cpu")
    teacher.max_seq_length = 12
    rows = {"anchor": [p["query"] for p in pairs[:6]], "positive": [p["positive"] for p in pairs[:6]],
            "negative_1": [p["positive"] for p in pairs[6:12]]}
    guide = Guide(teacher, "query: ", "passage: ", "teacher")
    collator = GuideCollator(BaseDataCollator(preprocess_fn=student.preprocess), guide)
    batch = collator([{c: rows[c][i] for c in rows} for i in range(6)])
    features, _ = SentenceTransformerTrainer.collect_features(None, batch)
    assert len(features) == 3
    module = guide_module_class()(teacher, student)
    with torch.no_grad():
        got = [module(dict(f))["sentence_embedding"].numpy() for f in features]
    want = [teacher.encode(rows["anchor"], prompt="query: ", convert_to_numpy=True)] + [
        teacher.encode(rows[c], prompt="passage: ", convert_to_numpy=True) for c in ("positive", "negative_1")]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # and the student still reads its own tokens (no prompt, its own max length)
    assert features[0]["input_ids"].shape != features[0]["guide:input_ids"].shape
