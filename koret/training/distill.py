"""Distillation from the mining teacher's scores, alone or added to a contrastive loss (``loss.distill``).

``koret mine`` stores, per training row, the teacher's score of the positive and of each chosen negative
(``train.parquet``'s ``scores``; the cross-encoder's scores when mine ran with ``rescore.model``). A contrastive
loss only says which passage is the positive; the scores also say by how much the teacher prefers it to each
hard negative, which is what score distillation teaches the student (Hofstätter et al., 2020, "Improving
Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation", arXiv:2010.02666: Margin-MSE;
Lin et al., 2021, "In-Batch Negatives for Knowledge Distillation with Tightly-Coupled Teachers for Dense
Retrieval", RepL4NLP: KL over the candidates; Moreira et al., 2024, arXiv:2407.15831, mine with the same
teacher scores).

The distillation term is sentence-transformers' own loss:

- ``kl``: DistillKLDivLoss, the KL divergence between the softmax over (positive, negative_1..N) of the teacher's
  scores and of the student's;
- ``margin_mse``: MarginMSELoss, the squared error between the student's and the teacher's
  ``score(positive) - score(negative_i)``.

Each side is read on its own scale: the student's cosines divided by ``temperature`` (by default the
contrastive loss's own, GIST 0.01, MNRL 0.05, so the term reads the student as the contrastive loss does), the
teacher's scores divided by ``teacher_temperature``, whose default follows what the scores are. koret mine
records that (``score_kind`` in stats.json and in train.parquet's metadata, :data:`koret.candidates.SCORE_KINDS`):

+-----------------------+--------------------------------------------+--------------------------------------+
| score_kind            | the scores                                 | default teacher_temperature          |
+=======================+============================================+======================================+
| teacher_cosine        | the mining teacher's cosines               | ``temperature`` (the student's)      |
+-----------------------+--------------------------------------------+--------------------------------------+
| cross_encoder_logits  | ``rescore.model``'s logits                 | 1.0                                  |
+-----------------------+--------------------------------------------+--------------------------------------+
| cross_encoder_sigmoid | their sigmoid, read back as logits         | 1.0                                  |
|                       | (``log p/(1-p)``, p clipped to float32's   |                                      |
|                       | open (0, 1): at most 16.6 in size)         |                                      |
+-----------------------+--------------------------------------------+--------------------------------------+
| cross_encoder_other   | another activation's output                | none: ``teacher_temperature`` needed |
+-----------------------+--------------------------------------------+--------------------------------------+

A file with no recorded kind in its metadata takes the ``score_kind`` of the ``stats.json`` beside it (koret mine
or filter wrote it); with neither (mined before koret recorded it, written by hand, converted) its scores are read
as teacher cosines when all lie in [-1, 1], koret's behaviour before the kind was recorded, and otherwise need
``teacher_temperature`` (a one-line error). Cosines of 0.80-0.95 are near-uniform at temperature 1, so a
cosine teacher shares the student's temperature; a cross-encoder's logits (spread over ~10 units) are its
softmax's own input: divided by 0.01 they would make one-hot targets (the "how much" lost, float32 underflow),
and their margins / 0.01 (500-1,000) would face student margins of at most 2 / 0.01 = 200: a term that cannot be
fitted and drowns the contrastive loss.

``margin_mse`` compares the same scaled scores as ``kl``: ``student margin / temperature`` with ``teacher margin
/ teacher_temperature`` (a logit margin of 10 at teacher_temperature 1 asks for a cosine margin of 10 x 0.05 =
0.5 under MNRL). With a cosine teacher and the defaults this is the squared error of the raw margins /
``temperature^2``, as before. On cross-encoder scores koret sets no default ``teacher_temperature`` for
margin_mse: the term grows with the square of the logits' spread (9x the MNRL term at weight 1 on logits spread
over ~11 units, tens of times on a strong reranker's), so the user chooses the scale, or uses ``kl``.

sentence-transformers' losses carry Hinton's ``T^2`` factor (the student temperature's, for the KL); koret
divides their value by ``temperature^2``, which gives exactly the KL, and the margin MSE, of the scaled scores:
``weight`` 1 then weighs a term of a few units at the start of training: a KL of at most about log(1 + N) while
the student is near uniform (0.2x the MNRL term in a test on logits spread over ~10 units); for margin_mse the
teacher's mean squared scaled margin.

:class:`ContrastivePlusDistillation` returns ``{"contrastive": c, "distill": weight x d}``; the trainer sums the
parts and logs each. With MultipleNegativesRankingLoss the student encodes the batch once for both terms
(``compute_loss_from_embeddings``); with GIST or a cached (GradCache) loss, which encode the batch themselves,
the distillation term encodes it a second time: about twice the student's compute.

Inputs:

+-----------------------------------------------+------------------------------------------+
| Texts                                         | Labels                                   |
+===============================================+==========================================+
| (anchor, positive, negative_1, ..., negative_N)| teacher scores [positive, neg_1..neg_N]  |
+-----------------------------------------------+------------------------------------------+
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from koret.candidates import (
    CROSS_ENCODER_LOGITS,
    CROSS_ENCODER_SIGMOID,
    SCORE_KINDS,
    TEACHER_COSINE,
    read_score_kind,
)
from koret.errors import KoretError

# the teacher's temperature by score kind; teacher_cosine: the student's (see the module table)
DEFAULT_TEACHER_TEMPERATURE = {CROSS_ENCODER_LOGITS: 1.0, CROSS_ENCODER_SIGMOID: 1.0}


UNRECORDED = "unrecorded"  # no kind recorded and the scores leave [-1, 1]: not cosines, scale unknown


def score_kind_of(train: str | None) -> str:
    """What ``data.train``'s ``scores`` are: the kind recorded in its parquet metadata, else in the
    ``stats.json`` koret mine / filter wrote beside it; with neither (a file mined before koret recorded the kind,
    a hand-made or converted file) teacher cosines when every score lies in [-1, 1] (koret's reading of every
    file before the kind was recorded), else :data:`UNRECORDED`, which needs ``teacher_temperature``."""
    from koret.data import split_source
    from koret.io import read_record

    if not train:
        return TEACHER_COSINE
    path, selection = split_source(train)
    if selection is None:
        recorded = read_score_kind(path) or (read_record(Path(path).parent / "stats.json") or {}).get("score_kind")
        if recorded:
            return str(recorded)
    return UNRECORDED if _scores_leave_cosine_range(path) else TEACHER_COSINE


def _scores_leave_cosine_range(path: str) -> bool:
    import numpy as np

    from koret.data import detect_format, read_table

    try:
        df = read_table(path, detect_format(path), "data.train", None)
    except KoretError:
        return False  # the data reader reports what is wrong with the file
    if "scores" not in df.columns:
        return False
    values = [v for row in df["scores"] if row is not None for v in np.ravel(np.asarray(row, dtype=float))]
    return bool(values) and float(np.nanmax(np.abs(values))) > 1.0 + 1e-6


@dataclasses.dataclass(frozen=True)
class TeacherScale:
    """The scales the distillation term reads: the student's cosines / ``student_temperature``, the teacher's
    scores (of ``kind``) / ``teacher_temperature``."""

    kind: str
    student_temperature: float
    teacher_temperature: float

    def __str__(self) -> str:
        return (f"teacher scores: {self.kind} / {self.teacher_temperature:g}, "
                f"student cosines / {self.student_temperature:g}")


def teacher_scale(dc: Any, kind: str, contrastive_temperature: float, source: str | None) -> TeacherScale:
    """``loss.distill``'s temperatures for teacher scores of ``kind`` (module table); one clear error when the
    kind has no default and ``teacher_temperature`` is not set, and for ``margin_mse`` on cross-encoder scores
    without it (their margins span several units: against cosine margins of at most 2 / temperature the term
    would be tens of times the contrastive one, so koret refuses to guess their scale)."""
    student = float(dc.temperature if dc.temperature is not None else contrastive_temperature)
    if dc.teacher_temperature is not None:
        return TeacherScale(kind, student, float(dc.teacher_temperature))
    if kind == TEACHER_COSINE:
        return TeacherScale(kind, student, student)
    if dc.name == "margin_mse":
        raise KoretError(f"loss.distill.teacher_temperature: required with margin_mse on data.train {source}'s "
                         f"{kind} scores: their margins span several units, student cosine margins at most 2 / "
                         f"{student:g}",
                         "set teacher_temperature to about (the teacher's typical margin) x temperature / 0.5, or "
                         "use loss.distill.name: kl, whose default scale fits cross-encoder scores")
    if kind in DEFAULT_TEACHER_TEMPERATURE:
        return TeacherScale(kind, student, DEFAULT_TEACHER_TEMPERATURE[kind])
    if kind == UNRECORDED:
        what = "records no score kind and its scores leave [-1, 1], so they are not cosines"
    elif kind in SCORE_KINDS:
        what = f"scores are {kind!r} (another activation's output), which has no default scale"
    else:
        what = f"scores are {kind!r}, a kind koret does not know"
    raise KoretError(f"loss.distill.teacher_temperature: required: data.train {source} {what}",
                     "set loss.distill.teacher_temperature so that score differences / it are a few units "
                     "(1.0 for cross-encoder logits), or re-mine with koret, which records the kind")


def teacher_logits(scores: Any, kind: str) -> Any:
    """The teacher's scores as its softmax reads them: ``cross_encoder_sigmoid`` scores back to logits
    (``log p - log(1 - p)``, p clipped to float32's open (0, 1), so at most 16.6 in size), others unchanged."""
    import torch

    if kind != CROSS_ENCODER_SIGMOID:
        return scores
    return torch.logit(scores, eps=2.0**-24)


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """Maps a batch's stored teacher scores to the labels the library loss compares with the student's cosines:
    logits (:func:`teacher_logits`); for margin_mse, also rescaled by ``scale`` = student / teacher temperature
    (MarginMSELoss has no temperatures: raw cosine margins are compared with teacher margins x scale)."""

    kind: str
    scale: float = 1.0

    def __call__(self, labels: Any) -> Any:
        logits = teacher_logits(labels, self.kind)
        return logits if self.scale == 1.0 else logits * self.scale


def build_distill_loss(dc: Any, student: Any, scale: TeacherScale) -> tuple[Any, float, TeacherTargets]:
    """sentence-transformers' DistillKLDivLoss or MarginMSELoss, scoring the student by cosine similarity (the
    similarity the student is trained on), the factor that turns its value into ``weight`` x the divergence
    of the scaled scores, and the map from stored teacher scores to the labels the loss reads."""
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.util import pairwise_cos_sim

    from koret.report import info

    info(f"loss.distill: {dc.name}, {scale}")
    t = scale.student_temperature
    if dc.name == "kl":  # its value is KL(softmax(teacher / t_teacher) || softmax(student / t)) x t^2
        loss = losses.DistillKLDivLoss(student, similarity_fct=pairwise_cos_sim, temperature=t,
                                       teacher_temperature=scale.teacher_temperature)
        return loss, dc.weight / t**2, TeacherTargets(scale.kind)
    # MSE(student margin - teacher margin x t / t_teacher) / t^2 = MSE(student margin / t - teacher margin / t_teacher)
    return (losses.MarginMSELoss(student, similarity_fct=pairwise_cos_sim), dc.weight / t**2,
            TeacherTargets(scale.kind, t / scale.teacher_temperature))


def combined_loss_class() -> type:
    import torch
    from sentence_transformers.sentence_transformer import losses

    class ContrastivePlusDistillation(torch.nn.Module):
        """``contrastive + weight x distill`` on the same batch (``contrastive`` None: the distillation alone).

        Args:
            model: the student SentenceTransformer.
            contrastive: a sentence-transformers contrastive loss (MNRL, GIST, their cached variants) or None.
            distill: DistillKLDivLoss or MarginMSELoss.
            weight: the factor of the distillation term (``loss.distill.weight / temperature^2``).
            targets: the batch's stored teacher scores -> the labels ``distill`` reads (:class:`TeacherTargets`);
                the contrastive loss gets the stored scores (the losses koret builds ignore them).
        """

        def __init__(self, model: Any, contrastive: Any | None, distill: Any, weight: float,
                     targets: Any = None) -> None:
            super().__init__()
            self.model = model
            self.contrastive = contrastive
            self.distill = distill
            self.weight = weight
            self.targets = targets if targets is not None else TeacherTargets(TEACHER_COSINE)
            # MNRL can score precomputed embeddings, so both terms share one forward pass
            self.shares_embeddings = type(contrastive) is losses.MultipleNegativesRankingLoss

        def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Any) -> dict[str, Any]:
            if labels is None:
                raise KoretError("loss.distill: the batch has no teacher scores")
            features = list(sentence_features)
            labels = labels.to(torch.float32)
            targets = self.targets(labels)
            if self.contrastive is None:
                return {"distill": self.weight * self.distill(features, targets)}
            if self.shares_embeddings:
                from sentence_transformers.base.losses.merged_forward import embed_columns

                embeddings = embed_columns(self.model, features)
                return {"contrastive": self.contrastive.compute_loss_from_embeddings(embeddings, labels),
                        "distill": self.weight * self.distill.compute_loss_from_embeddings(embeddings, targets)}
            contrastive = self.contrastive([dict(f) for f in features], labels)
            return {"contrastive": contrastive, "distill": self.weight * self.distill(features, targets)}

        @property
        def citation(self) -> str:
            return """
@misc{hofstaetter2020improving,
    title={Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation},
    author={Sebastian Hofst{\\"a}tter and Sophia Althammer and Michael Schr{\\"o}der and Mete Sertkan and
            Allan Hanbury},
    year={2020},
    eprint={2010.02666},
    archivePrefix={arXiv},
}
"""

    return ContrastivePlusDistillation


def check_scores(scores: list[Any], num_negatives: int, source: str) -> list[list[float]]:
    """The ``scores`` column as float lists of length 1 + ``num_negatives``, else one clear error naming the row."""
    import math

    out: list[list[float]] = []
    for i, row in enumerate(scores):
        values = None if row is None else [float(v) for v in row]
        if values is None or len(values) != num_negatives + 1 or any(math.isnan(v) for v in values):
            got = "none" if values is None else f"{len(values)} values" + (
                " with NaN" if any(math.isnan(v) for v in values) else "")
            raise KoretError(f"data.train: {source}: row {i} has no usable teacher scores for loss.distill ({got}; "
                             f"expected {num_negatives + 1}: the positive's, then each negative's)",
                             "mine it with koret mine (on_shortage drop), or remove loss.distill")
        out.append(values)
    return out
