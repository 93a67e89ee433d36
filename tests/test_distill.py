"""loss.distill: the combined loss is the sum of its parts (values and gradients), KL by hand, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import run_cli, write_config
from test_train import mined, train_config  # noqa: F401  (the module-scoped mined fixture)

COLS = ["anchor", "positive", "negative_1", "negative_2", "negative_3"]


def _batch(model, mined_dir: Path, rows: int = 12):
    df = pd.read_parquet(mined_dir / "train.parquet").head(rows)
    labels = torch.tensor(np.stack(df["scores"].tolist()), dtype=torch.float32)
    return (lambda: [model.preprocess(df[c].tolist()) for c in COLS]), labels


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _loss(name: str, model, distill: dict | None):
    from koret.config import TrainConfig
    from koret.training.biencoder import build_loss

    cfg = TrainConfig.model_validate({"loss": {"name": name, "mini_batch_size": 4,
                                               **({"distill": distill} if distill else {})}})
    return build_loss(cfg, model, None)


@pytest.mark.parametrize("contrastive", ["mnrl", "cached_mnrl"])
@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_combined_loss_is_the_sum_of_its_parts(tiny_model, mined, contrastive, kind):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.eval()  # no dropout: every pass sees the same network
    features, labels = _batch(model, mined)
    weight = 0.7
    combined = _loss(contrastive, model, {"name": kind, "weight": weight})
    parts = combined(features(), labels)
    assert set(parts) == {"contrastive", "distill"}
    sum(parts.values()).backward()
    g_combined = _grads(model)

    model.zero_grad()
    alone = _loss(contrastive, model, None)(features(), labels)
    alone.backward()
    g_contrastive = _grads(model)
    model.zero_grad()
    distill_only = _loss("none", model, {"name": kind, "weight": 1.0})(features(), labels)["distill"]
    distill_only.backward()
    g_distill = _grads(model)

    assert parts["contrastive"].item() == pytest.approx(alone.item(), rel=1e-5)
    assert parts["distill"].item() == pytest.approx(weight * distill_only.item(), rel=1e-5)
    ref = g_contrastive + weight * g_distill
    assert (g_combined - ref).norm() <= 1e-5 * ref.norm(), "gradients add up (float32 rounding aside)"


def test_distill_terms_equal_the_formulas(tiny_model, mined):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.eval()
    features, labels = _batch(model, mined)
    got = _loss("none", model, {"name": "kl", "temperature": 0.1})(features(), labels)["distill"].item()
    with torch.no_grad():
        emb = [torch.nn.functional.normalize(model(f)["sentence_embedding"], dim=-1) for f in features()]
    student = torch.stack([(emb[0] * e).sum(-1) for e in emb[1:]], dim=1) / 0.1
    teacher = torch.softmax(labels / 0.1, dim=1)
    expected = (teacher * (teacher.log() - torch.log_softmax(student, dim=1))).sum(1).mean()  # the plain KL
    assert got == pytest.approx(expected.item(), rel=1e-4)
    got = _loss("none", model, {"name": "margin_mse", "temperature": 0.1, "weight": 2.0})(features(), labels)
    margins_s = (student[:, :1] - student[:, 1:])  # already divided by the temperature
    margins_t = (labels[:, :1] - labels[:, 1:]) / 0.1
    assert got["distill"].item() == pytest.approx(2.0 * ((margins_s - margins_t) ** 2).mean().item(), rel=1e-4)


def test_rows_without_scores_are_a_clear_error(tmp_path, tiny_model, mined):  # noqa: F811
    df = pd.read_parquet(mined / "train.parquet")
    df.loc[3, "scores"] = None
    bad = tmp_path / "bad.parquet"
    df.to_parquet(bad)
    cfg = train_config(tmp_path, tiny_model, bad)
    cfg["loss"] = {"name": "mnrl", "distill": {"name": "kl"}}
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 2 and "row 3 has no usable teacher scores" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "train").exists()
    df.drop(columns=["scores"]).to_parquet(bad)
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 2 and "no 'scores' column" in result.stderr, result.stderr
    cfg["loss"] = {"name": "none"}
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 2 and "loss.distill" in result.stderr, result.stderr


def test_train_with_distillation_logs_both_parts(tmp_path, tiny_model, mined):  # noqa: F811
    cfg = train_config(tmp_path, tiny_model, mined / "train.parquet")
    cfg["loss"] = {"name": "cached_gist", "mini_batch_size": 8, "distill": {"name": "kl", "weight": 0.5}}
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["distill"] == {"name": "kl", "weight": 0.5, "temperature": None}
    first = metrics["loss_curve"][0]
    assert {"contrastive", "distill"} <= set(first), first
    assert first["loss"] == pytest.approx(first["contrastive"] + first["distill"], rel=1e-3)
