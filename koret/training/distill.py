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

Both compare scores divided by ``temperature``, by default the contrastive loss's own (GIST 0.01, MNRL 0.05):
the distillation term then reads the student's scores on the scale the contrastive loss reads them, and a
``weight`` of 1 means comparable magnitudes. (Teacher cosines of 0.80-0.95 are near-uniform at temperature 1,
and sentence-transformers' losses work at temperature 1 with Hinton's ``T^2`` factor; koret divides their value
by ``T^2``, which gives exactly the KL, and the margin MSE, of the temperature-scaled scores.)

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

from collections.abc import Iterable
from typing import Any

from koret.errors import KoretError


def build_distill_loss(dc: Any, student: Any, temperature: float) -> tuple[Any, float]:
    """sentence-transformers' DistillKLDivLoss or MarginMSELoss, scoring the student by cosine similarity (the
    similarity the teacher's stored scores use), and the factor that turns its value into ``weight`` x the
    divergence of the temperature-scaled scores."""
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.util import pairwise_cos_sim

    t = dc.temperature if dc.temperature is not None else temperature
    if dc.name == "kl":  # its value is KL(teacher/t || student/t) x t^2
        return losses.DistillKLDivLoss(student, similarity_fct=pairwise_cos_sim, temperature=t), dc.weight / t**2
    # MSE of margins / t = MSE of raw margins / t^2
    return losses.MarginMSELoss(student, similarity_fct=pairwise_cos_sim), dc.weight / t**2


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
        """

        def __init__(self, model: Any, contrastive: Any | None, distill: Any, weight: float) -> None:
            super().__init__()
            self.model = model
            self.contrastive = contrastive
            self.distill = distill
            self.weight = weight
            # MNRL can score precomputed embeddings, so both terms share one forward pass
            self.shares_embeddings = type(contrastive) is losses.MultipleNegativesRankingLoss

        def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Any) -> dict[str, Any]:
            if labels is None:
                raise KoretError("loss.distill: the batch has no teacher scores")
            features = list(sentence_features)
            labels = labels.to(torch.float32)
            if self.contrastive is None:
                return {"distill": self.weight * self.distill(features, labels)}
            if self.shares_embeddings:
                from sentence_transformers.base.losses.merged_forward import embed_columns

                embeddings = embed_columns(self.model, features)
                return {"contrastive": self.contrastive.compute_loss_from_embeddings(embeddings, labels),
                        "distill": self.weight * self.distill.compute_loss_from_embeddings(embeddings, labels)}
            contrastive = self.contrastive([dict(f) for f in features], labels)
            return {"contrastive": contrastive, "distill": self.weight * self.distill(features, labels)}

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
