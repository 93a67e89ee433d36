"""loss.distill: the combined loss is the sum of its parts (values and gradients), KL by hand, bad rows; the
teacher on its own scale: the kind of scores mine and filter record, read by train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import mine_config, run_cli, write_config
from test_train import mined, train_config  # noqa: F401  (the module-scoped mined fixture)

from koret.errors import KoretError

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
    assert metrics["distill"] == {"name": "kl", "weight": 0.5, "temperature": None, "teacher_temperature": None,
                                  # what the defaults resolved to: GIST's 0.01 for the student and the cosine teacher
                                  "score_kind": "teacher_cosine", "resolved_temperature": 0.01,
                                  "resolved_teacher_temperature": 0.01}
    first = metrics["loss_curve"][0]
    assert {"contrastive", "distill"} <= set(first), first
    assert first["loss"] == pytest.approx(first["contrastive"] + first["distill"], rel=1e-3)


# ------------------------------------------------------------------------------- the teacher on its own scale


def _with_scores(src: Path, folder: Path, scores: np.ndarray | None, kind: str | None) -> Path:
    """``folder``/train.parquet: ``src``'s rows with ``scores`` (None: kept) and ``kind`` recorded in the metadata
    (None: none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.read_parquet(src)
    if scores is not None:
        df["scores"] = list(scores.astype(np.float32))
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(
        None if kind is None else {b"koret.score_kind": kind.encode()})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "train.parquet")
    return folder / "train.parquet"


def _logits(rows: int) -> np.ndarray:
    """Cross-encoder-like logits spread over ~10 units: the positive 3..7, the negatives -5..3, best first."""
    rng = np.random.default_rng(0)
    negatives = -np.sort(-rng.uniform(-5.0, 3.0, size=(rows, 3)), axis=1)
    return np.concatenate([rng.uniform(3.0, 7.0, size=(rows, 1)), negatives], axis=1)


def _distill_loss(model, train: Path, distill: dict, name: str = "mnrl"):
    from koret.config import TrainConfig
    from koret.training.biencoder import build_loss

    cfg = TrainConfig.model_validate({"data": {"train": str(train)}, "loss": {"name": name, "distill": distill}})
    return build_loss(cfg, model, None)


def _student_scores(model, features, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        emb = [torch.nn.functional.normalize(model(f)["sentence_embedding"], dim=-1) for f in features()]
    return torch.stack([(emb[0] * e).sum(-1) for e in emb[1:]], dim=1) / temperature


def test_cross_encoder_logits_keep_their_scale(tmp_path, tiny_model, mined, caplog):  # noqa: F811
    """Logits spread over ~10 units: KL targets are softmax(logits / 1), not one-hot, no underflow warning, and
    the term at step 0 is within 10x of the contrastive term at weight 1 (at the student's 0.05 they were one-hot
    and the library warned of underflow)."""
    import logging

    from sentence_transformers import SentenceTransformer

    rows = len(pd.read_parquet(mined / "train.parquet"))
    train = _with_scores(mined / "train.parquet", tmp_path / "logits", _logits(rows), "cross_encoder_logits")
    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.eval()
    features, labels = _batch(model, train.parent)
    spread = (labels.max(1).values - labels.min(1).values)
    assert spread.max() > 8, "the fixture's logits spread over ~10 units"
    teacher = torch.softmax(labels / 1.0, dim=1)
    # at temperature 1 every candidate keeps its share (at 0.05: exp(-spread / 0.05), below float32's least value)
    assert (teacher.min(1).values > 1e-6).all() and (teacher.max(1).values < 1 - 1e-4).all(), teacher

    with caplog.at_level(logging.WARNING):
        parts = _distill_loss(model, train, {"name": "kl"})(features(), labels)
    assert "underflow" not in caplog.text, caplog.text
    student = _student_scores(model, features, 0.05)  # MNRL's temperature
    expected = (teacher * (teacher.log() - torch.log_softmax(student, dim=1))).sum(1).mean()
    assert parts["distill"].item() == pytest.approx(expected.item(), rel=1e-4)
    ratio = parts["distill"].item() / parts["contrastive"].item()
    assert 0.1 < ratio < 10, (parts, ratio)

    # loss.distill.teacher_temperature overrides the kind's default
    parts = _distill_loss(model, train, {"name": "kl", "teacher_temperature": 2.0})(features(), labels)
    teacher = torch.softmax(labels / 2.0, dim=1)
    expected = (teacher * (teacher.log() - torch.log_softmax(student, dim=1))).sum(1).mean()
    assert parts["distill"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_margin_mse_on_logits_compares_scaled_margins(tmp_path, tiny_model, mined):  # noqa: F811
    """margin_mse on logits: student margin / temperature against teacher margin / teacher_temperature (1), the
    scores the KL compares: a logit margin of 10 asks for a cosine margin of 0.5, which a student can reach."""
    from sentence_transformers import SentenceTransformer

    rows = len(pd.read_parquet(mined / "train.parquet"))
    train = _with_scores(mined / "train.parquet", tmp_path / "logits", _logits(rows), "cross_encoder_logits")
    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.eval()
    features, labels = _batch(model, train.parent)
    with pytest.raises(KoretError, match="teacher_temperature: required with margin_mse"):
        _distill_loss(model, train, {"name": "margin_mse", "weight": 0.5})  # no default scale for logit margins
    parts = _distill_loss(model, train, {"name": "margin_mse", "weight": 0.5, "teacher_temperature": 4.0})(
        features(), labels)
    student = _student_scores(model, features, 0.05)
    margins_s = student[:, :1] - student[:, 1:]
    margins_t = (labels[:, :1] - labels[:, 1:]) / 4.0
    expected = 0.5 * ((margins_s - margins_t) ** 2).mean()
    assert parts["distill"].item() == pytest.approx(expected.item(), rel=1e-4)
    # within 10x of the contrastive term at weight 1 with the scale set; x 1 / 0.05^2 it was ~4,500x
    assert parts["distill"].item() / 0.5 < 10 * parts["contrastive"].item(), parts


def test_kinds_without_a_scale_need_a_teacher_temperature(tmp_path, tiny_model, mined):  # noqa: F811
    train = _with_scores(mined / "train.parquet", tmp_path / "other", None, "cross_encoder_other")
    cfg = train_config(tmp_path, tiny_model, train)
    cfg["loss"] = {"name": "mnrl", "distill": {"name": "kl"}}
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 2, result.stderr
    assert "loss.distill.teacher_temperature: required" in result.stderr and "cross_encoder_other" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "train").exists()
    cfg["loss"]["distill"]["teacher_temperature"] = 0  # validated with the config, before any data loads
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 2 and "teacher_temperature" in result.stderr, result.stderr


def test_files_without_a_kind_are_teacher_cosines(tmp_path, mined):  # noqa: F811
    from koret.training.distill import score_kind_of

    assert score_kind_of(str(mined / "train.parquet")) == "teacher_cosine"  # recorded by mine
    bare = _with_scores(mined / "train.parquet", tmp_path / "bare", None, None)
    assert score_kind_of(str(bare)) == "teacher_cosine"
    pd.read_parquet(bare).to_json(tmp_path / "bare.jsonl", orient="records", lines=True, force_ascii=False)
    assert score_kind_of(str(tmp_path / "bare.jsonl")) == "teacher_cosine"
    # a rescored file that lost its metadata (converted, copied): the stats.json beside it still says
    (bare.parent / "stats.json").write_text('{"score_kind": "cross_encoder_sigmoid"}')
    assert score_kind_of(str(bare)) == "cross_encoder_sigmoid"
    # logits with no record anywhere: not cosines, so no guess
    logits = _with_scores(mined / "train.parquet", tmp_path / "nokind", _logits(len(pd.read_parquet(bare))), None)
    assert score_kind_of(str(logits)) == "unrecorded"


def test_cross_encoder_score_kind_follows_its_activation(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    from koret.candidates import cross_encoder_score_kind

    assert cross_encoder_score_kind(CrossEncoder(str(tiny_cross_encoder), device="cpu")) == "cross_encoder_sigmoid"
    for activation, kind in ((torch.nn.Identity(), "cross_encoder_logits"), (torch.nn.Tanh(), "cross_encoder_other")):
        ce = CrossEncoder(str(tiny_cross_encoder), device="cpu", activation_fn=activation)
        assert cross_encoder_score_kind(ce) == kind


@pytest.fixture(scope="module")
def mined_rescored(tmp_path_factory, tiny_model, tiny_cross_encoder, data_dir) -> Path:
    """Mined with rescore.model (the fixture cross-encoder: sigmoid outputs), 3 negatives."""
    tmp = tmp_path_factory.mktemp("rescored")
    cfg = mine_config(tmp, tiny_model, data_dir / "pairs.jsonl", data__corpus=str(data_dir / "corpus.txt"),
                      rescore__model=str(tiny_cross_encoder), filter__strategy="margin_pos", filter__margin=0.0,
                      search__top_k=20)
    result = run_cli("mine", "-c", str(write_config(tmp / "m.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "out"


def test_mine_and_filter_record_the_kind_and_train_reads_it(tmp_path, tiny_model, mined, mined_rescored):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    from koret.candidates import read_score_kind

    for folder, kind in ((mined, "teacher_cosine"), (mined_rescored, "cross_encoder_sigmoid")):
        assert json.loads((folder / "stats.json").read_text())["score_kind"] == kind
        assert read_score_kind(folder / "train.parquet") == read_score_kind(folder / "candidates.parquet") == kind
    result = run_cli("filter", "-c", str(mined_rescored / "config.yaml"), "--set", f"output.dir={tmp_path}/re",
                     "--set", f"filter.candidates={mined_rescored}", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "re" / "stats.json").read_text())["score_kind"] == "cross_encoder_sigmoid"
    assert read_score_kind(tmp_path / "re" / "train.parquet") == "cross_encoder_sigmoid"

    # train reads the sigmoid outputs back as logits, at teacher temperature 1
    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.eval()
    train = mined_rescored / "train.parquet"
    features, labels = _batch(model, train.parent)
    assert ((labels > 0) & (labels < 1)).all(), "sigmoid outputs"
    parts = _distill_loss(model, train, {"name": "kl"})(features(), labels)
    teacher = torch.softmax(torch.log(labels) - torch.log1p(-labels), dim=1)
    student = _student_scores(model, features, 0.05)
    expected = (teacher * (teacher.log() - torch.log_softmax(student, dim=1))).sum(1).mean()
    assert parts["distill"].item() == pytest.approx(expected.item(), rel=1e-4)
