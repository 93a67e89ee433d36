"""The bi-encoder's parts of ``koret train``: training tuples, the student, the GIST guide reading its own
tokens, and the losses.

The loss is sentence-transformers' own:

- ``gist`` / ``cached_gist``: GISTEmbedLoss / CachedGISTEmbedLoss (Solatorio, 2024, arXiv:2402.16829). The
  guide model scores every in-batch pair; an in-batch negative the guide rates above the positive (or within
  ``loss.margin`` of it, ``margin_strategy`` absolute or relative, after NV-Retriever, arXiv:2407.15831) is a
  suspected false negative and is masked. ``cached_gist`` adds GradCache (Gao et al., 2021, arXiv:2101.06983):
  global batches in the thousands at the memory of ``loss.mini_batch_size``.
- ``mnrl`` / ``cached_mnrl``: MultipleNegativesRankingLoss without a guide.

``loss.distill`` adds distillation from the mined teacher scores (:mod:`koret.training.distill`); with
``loss.name: none`` it is the whole loss.

``loss.matryoshka_dims`` wraps the loss in MatryoshkaLoss (the full dimension always included).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from koret.config import TrainConfig
from koret.data import detect_format, load_section, normalize_text, read_table, row_selection, split_source
from koret.encode import load_sentence_transformer, resolve_model_path
from koret.errors import KoretError
from koret.io import read_record
from koret.prompts import resolve_prompts
from koret.sources import training_source_key
from koret.training.common import negative_columns
from koret.training.sources import (
    SOURCE_COLUMN,
    SourceRows,
    common_mined_config,
    negatives_text,
    no_rows_error,
    num_rows,
    select_source,
    split_rows,
)

GIST_LOSSES = ("gist", "cached_gist")


# --------------------------------------------------------------------------------------------- data


LABEL = "label"  # the teacher scores [positive, negative_1..N] under loss.distill (sentence-transformers' name)


@dataclasses.dataclass
class TrainData:
    dataset: Any  # datasets.Dataset with anchor, positive, negative_1..N (+ label: teacher scores); a DatasetDict
    num_negatives: int | str  # of several sources: their range when they differ ("3-7")
    source: str
    mined_config: dict[str, Any] | None  # config.yaml of the koret mine run that wrote data.train
    sources: list[SourceRows] | None = None  # several sources: one dataset of the DatasetDict each

    @property
    def rows(self) -> int:
        return num_rows(self.dataset)


def _mined_config(path: str) -> dict[str, Any] | None:
    p = Path(path)
    loaded = read_record((p if p.is_dir() else p.parent) / "config.yaml")
    return loaded if loaded and "teacher" in loaded and "filter" in loaded else None


def load_train_data(cfg: TrainConfig) -> TrainData:
    """Tuples (``anchor``, ``positive``, ``negative_*``) from a mined file, or pairs through the data layer; with
    several sources (``data.sources``, or a several-source mine's train.parquet as ``data.train``) a DatasetDict
    of one dataset per source (:mod:`koret.training.sources`)."""
    from datasets import Dataset

    d = cfg.data
    if d.sources:
        parts = []
        for src in d.sources:
            key = training_source_key(src)
            columns, n_neg, path, _ = _source_columns(cfg, src, key, src.name)
            parts.append((SourceRows(src.name, src.train, src.weight, src, _mined_config(path)), columns, n_neg))
        return _several(cfg, parts)
    if not d.train:
        raise KoretError("data.train: required key is missing", "point it at runs/mine/train.parquet")
    columns, n_neg, path, row_sources = _source_columns(cfg, d, "data.train", None)
    if row_sources is not None:  # a several-source mine's file: each of its sources is a source of this run
        names, of_row = row_sources
        split = split_rows(columns, of_row, names)
        if len(split) > 1:
            mined = _mined_config(path)
            return _several(cfg, [(SourceRows(name, d.train, 1.0, None, mined), cols, n_neg)
                                  for name, cols in split.items()])
    return TrainData(Dataset.from_dict(columns), n_neg, d.train, _mined_config(path))


def _source_columns(cfg: TrainConfig, src: Any, key: str, name: str | None) -> tuple[
        dict[str, list[Any]], int, str, tuple[list[str], list[str]] | None]:
    """One source's training columns (with the teacher scores under loss.distill), its negatives per row, its
    file, and, for a several-source mine's file read whole (``name`` None), (its sources, each row's source)."""
    path, selection = split_source(src.train)
    fmt = detect_format(path, key) if src.format == "auto" else src.format
    columns: dict[str, list[Any]] | None = None
    scores = row_sources = None
    if selection is None and fmt in ("parquet", "jsonl", "json", "csv", "tsv", "hf_disk"):
        df = read_table(path, fmt, key, src.split)
        df, names = select_source(df, path, key, name)  # a several-source mine's file: this source's rows
        df = df.iloc[row_selection(len(df), src)]  # data.limit's first rows, or data.sample's draw
        if "anchor" in df.columns or negative_columns(df.columns):
            columns = _tuple_columns(df, path, key)
            scores = df["scores"].tolist() if "scores" in df.columns else None
            row_sources = (names, df[SOURCE_COLUMN].tolist()) if names else None
    if columns is None:
        data = load_section(src, "train", key=key)
        columns = {"anchor": [data.queries[q] for q, _ in data.pairs],
                   "positive": [data.corpus[p] for _, p in data.pairs]}
    if not columns["anchor"]:
        raise no_rows_error(key, src.train, name)
    n_neg = len(columns) - 2
    if cfg.loss.distill is not None:
        from koret.training.distill import score_kind_of, teacher_scale

        columns[LABEL] = _teacher_scores(scores, n_neg, src.train, len(columns["anchor"]))
        # the scores' kind and the teacher's temperature, checked before any model loads (build_loss uses them)
        teacher_scale(cfg.loss.distill, score_kind_of(src.train), loss_temperature(cfg.loss), src.train)
    return columns, n_neg, path, row_sources


def _several(cfg: TrainConfig, parts: list[tuple[SourceRows, dict[str, list[Any]], int]]) -> TrainData:
    """The DatasetDict of several sources (with holdout, split later, per source)."""
    from datasets import Dataset, DatasetDict

    sources = []
    for source, columns, n_neg in parts:
        source.rows, source.num_negatives = len(columns["anchor"]), n_neg
        sources.append(source)
    needs_teacher = cfg.loss.name in GIST_LOSSES and cfg.loss.guide in (None, "teacher")
    return TrainData(DatasetDict({s.name: Dataset.from_dict(columns) for s, (_, columns, _) in zip(sources, parts,
                                                                                                  strict=True)}),
                     negatives_text(sources), ", ".join(s.name for s in sources),
                     common_mined_config(sources, needs_teacher), sources)


def source_prompts(model_prompts: dict[str, str], data: TrainData, default: tuple[str, str]) -> dict[str, tuple[
        str, str]]:
    """Each source's (query prompt, passage prompt): its own entry's where set (a text, or a name of the model's
    prompts, :mod:`koret.prompts`), else the model section's ``default``."""
    from koret.prompts import resolve_prompt

    out = {}
    for s in data.sources or []:
        sides = []
        for side, fallback in zip(("query", "passage"), default, strict=True):
            text = getattr(s.entry, f"{side}_prompt", None)
            name = getattr(s.entry, f"{side}_prompt_name", None)
            sides.append(fallback if text is None and name is None else
                         resolve_prompt(model_prompts, text, name, (), f"data.sources.{s.name}.{side}"))
        out[s.name] = (sides[0], sides[1])
    return out


def _teacher_scores(scores: list[Any] | None, n_neg: int, source: str, rows: int) -> list[list[float]]:
    from koret.training.distill import check_scores

    if n_neg == 0:
        raise KoretError(f"data.train: {source}: loss.distill needs hard negatives with teacher scores, and these "
                         "rows have none", "train on a koret mine train.parquet, or remove loss.distill")
    if scores is None:
        raise KoretError(f"data.train: {source}: loss.distill needs the teacher scores, and there is no 'scores' "
                         "column", "train on a koret mine train.parquet (it has one), or remove loss.distill")
    return check_scores(scores[:rows], n_neg, source)


def _tuple_columns(df: Any, path: str, key: str = "data.train") -> dict[str, list[str]]:
    cols = [str(c) for c in df.columns]
    missing = [c for c in ("anchor", "positive") if c not in cols]
    if missing:
        raise KoretError(f"{key}: {path}: column {missing[0]!r} not found; available columns: {', '.join(cols)}",
                         "a mined file has anchor, positive, negative_1..N")
    negs = negative_columns(cols)
    out: dict[str, list[str]] = {}
    for name in ["anchor", "positive", *negs]:
        values = df[name].tolist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            if name in negs:
                raise KoretError(f"{key}: {path}: rows have varying negative counts ({len(bad):,} rows, e.g. row "
                                 f"{df.index[bad[0]]}, have no {name!r})",
                                 "every row needs the same number of negatives: mine with on_shortage drop")
            raise KoretError(f"{key}: {path}: row {df.index[bad[0]]} column {name!r} is empty")
        out[name] = [normalize_text(v) for v in values]
    return out


def ir_evaluator(cfg: TrainConfig, query_prompt: str, passage_prompt: str, batch_size: int) -> Any:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    d = cfg.data
    data = load_section(d, "eval", prefix="eval_")
    qids = [q for q in range(len(data.queries)) if any(g > 0 for g in data.qrels[q].values())]
    if d.eval_max_queries:
        qids = qids[: d.eval_max_queries]
    queries = {str(q): data.queries[q] for q in qids}
    corpus = {str(i): t for i, t in enumerate(data.corpus)}
    relevant = {str(q): {str(doc) for doc, g in data.qrels[q].items() if g > 0} for q in qids}
    return InformationRetrievalEvaluator(
        queries, corpus, relevant, name="eval", batch_size=batch_size, query_prompt=query_prompt or None,
        corpus_prompt=passage_prompt or None, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10],
        precision_recall_at_k=[10, 100], map_at_k=[100], write_csv=False, show_progress_bar=False,
    )


# --------------------------------------------------------------------------------------------- models


def load_student(cfg: TrainConfig, device: str | None = None) -> Any:
    """A SentenceTransformer (its own pooling); a plain transformers model gets ``model.pooling`` +
    normalization (:func:`koret.encode.build_sentence_transformer`). Weights in ``model.dtype``, attention
    through ``model.attn_implementation``, its dropout ``model.attention_dropout`` (:mod:`koret.training.attention`;
    the model's own values, which the saved configs keep, as ``model.koret_own_dropout``)."""
    from koret.encode import build_sentence_transformer, default_device, load_kwargs
    from koret.training.attention import dropout_overrides
    from koret.training.lora import base_dtype

    name = cfg.model.name
    if not name:
        raise KoretError("model.name: required key is missing", "a SentenceTransformer or encoder Hub id / folder")
    ref = resolve_model_path(name, "model.name")
    local = Path(ref)
    is_st = (local / "modules.json").exists() if local.is_dir() else _hub_has_modules(ref)
    device = default_device(device)
    dtype = base_dtype(cfg.model.dtype, cfg.model.lora is not None, device)
    overrides, own = dropout_overrides(cfg.model.attention_dropout, ref, device.startswith("cuda"))
    if is_st:
        model = load_sentence_transformer(name, key="model.name", device=device, dtype=dtype,
                                          max_seq_length=cfg.model.max_seq_length,
                                          attn_implementation=cfg.model.attn_implementation, config_kwargs=overrides)
    else:
        model = build_sentence_transformer(ref, key="model.name", pooling=cfg.model.pooling, device=device,
                                           model_kwargs=load_kwargs(dtype, device, cfg.model.attn_implementation),
                                           max_seq_length=cfg.model.max_seq_length,
                                           attn_implementation=cfg.model.attn_implementation, config_kwargs=overrides)
    model.koret_own_dropout = own
    return model


def _hub_has_modules(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "modules.json")
        if isinstance(found, str):
            return True
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            return False
        from huggingface_hub import file_exists

        return bool(file_exists(repo_id, "modules.json"))
    except Exception:
        return False


@dataclasses.dataclass
class Guide:
    """The GIST guide with the prompts it scores with (the teacher's, when the guide is the mining teacher)."""

    model: Any
    query_prompt: str
    passage_prompt: str
    description: str


def resolve_guide(cfg: TrainConfig, data: TrainData, student: Any, student_prompts: tuple[str, str]) -> Guide:
    """The GIST guide. The mining teacher (the default for mined data) scores texts as it did in mining: its
    prompts, max length and dtype from the mine run's config.yaml."""
    from koret.config import TeacherConfig, validate

    guide = cfg.loss.guide
    teacher = (data.mined_config or {}).get("teacher", {}).get("model")
    if guide in (None, "teacher") and teacher:
        key = "loss.guide (the mining teacher)"
        tcfg = validate(TeacherConfig, data.mined_config["teacher"], f"{data.source}: mined config.yaml")
        model = load_sentence_transformer(teacher, key=key, device=str(student.device), dtype=tcfg.dtype,
                                          max_seq_length=tcfg.max_seq_length)
        q, p = resolve_prompts(model.prompts, tcfg, "teacher")
        return Guide(_freeze(model), q, p, f"teacher: {teacher}")
    if guide == "teacher":
        raise KoretError(f"loss.guide: 'teacher' requested, but {data.source} has no koret mine config.yaml beside "
                         f"it naming a teacher; no guide is available for loss {cfg.loss.name!r}",
                         "set loss.guide to a model, 'student', or use loss mnrl / cached_mnrl")
    if guide in (None, "student"):
        return Guide(_freeze(copy.deepcopy(student)), *student_prompts, "student: frozen copy of the initial model")
    model = load_sentence_transformer(guide, key="loss.guide", device=str(student.device))
    q, p = resolve_prompts(model.prompts, None, "loss.guide")
    return Guide(_freeze(model), q, p, guide)


GUIDE_PREFIX = "guide:"


def guide_module_class() -> type:
    import torch

    class GuideOnOwnInputs(torch.nn.Module):
        """The guide as GISTEmbedLoss / CachedGISTEmbedLoss call it, reading its own tokens.

        The library hands the guide the student's features (or the student's tokens decoded and re-tokenized),
        so the guide would see the student's prompt and max length. koret's collator adds the guide's own
        tokens of the raw texts, with the guide's prompts and max length, under ``guide:*`` keys of every
        column; this module feeds those to the guide. It shows the student's tokenizer and max length so the
        library does not re-tokenize.
        """

        def __init__(self, guide: Any, student: Any) -> None:
            super().__init__()
            self.guide = guide
            self.tokenizer = student.tokenizer
            self.max_seq_length = student.max_seq_length

        @property
        def device(self) -> Any:
            return self.guide.device

        def forward(self, features: dict[str, Any]) -> dict[str, Any]:
            own = {k[len(GUIDE_PREFIX):]: v for k, v in features.items() if k.startswith(GUIDE_PREFIX)}
            if not own:
                raise RuntimeError("the guide's inputs are missing from the batch (koret's GuideCollator not used)")
            return self.guide(own)

    return GuideOnOwnInputs


class GuideCollator:
    """Wraps the trainer's collator: each text column also gets the guide's tokens (``<column>_guide:*``)."""

    def __init__(self, collator: Any, guide: Guide, query_column: str = "anchor") -> None:
        self.collator = collator
        self.guide = guide
        self.query_column = query_column
        self.valid_label_columns = getattr(collator, "valid_label_columns", [])

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        columns = [c for c in features[0] if c not in ("dataset_name", *self.valid_label_columns)]
        for col in columns:
            prompt = self.guide.query_prompt if col == self.query_column else self.guide.passage_prompt
            encoded = self.guide.model.preprocess([row[col] for row in features], prompt=prompt or None)
            for key, value in encoded.items():
                batch[f"{col}_{GUIDE_PREFIX}{key}"] = value
        return batch


def _freeze(model: Any) -> Any:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def stack_features(features: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Concatenate tokenized batches along the batch axis, right-padding each key to its longest sequence.

    Padded batches only: a flattened (unpadded, flash-attention ``cu_seq_lens_q``) batch cannot be stacked row
    by row, as sentence-transformers' own merge refuses it too.
    """
    import torch

    if any("cu_seq_lens_q" in f for f in features):
        raise KoretError("loss.name gist: several negative columns cannot be stacked from unpadded (flash-attention "
                         "cu_seq_lens_q) batches", "use loss.name cached_gist, or a padded attention implementation")
    out: dict[str, Any] = {}
    for key in features[0]:
        parts = [f[key] for f in features]
        if torch.is_tensor(parts[0]) and parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            fill = pad_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) if p.shape[1] < width else p
                     for p in parts]
        out[key] = torch.cat(parts, dim=0) if torch.is_tensor(parts[0]) else parts[0]
    return out


def _multi_negative_gist() -> type:
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    class MultiNegativeGISTEmbedLoss(GISTEmbedLoss):
        """GISTEmbedLoss over (anchor, positive, negative_1..N).

        sentence-transformers 6.x's GISTEmbedLoss takes at most one negative column, while CachedGISTEmbedLoss
        takes any number. This stacks the N negative columns into one column of B x N texts before the library's
        own forward: each anchor is then scored against the same set of candidates as in CachedGISTEmbedLoss
        (column order aside, which cross-entropy ignores), so the two losses agree on a batch.
        """

        def forward(self, sentence_features, labels=None):  # noqa: ANN001, ANN201
            if len(sentence_features) > 3:
                pad = self.model.tokenizer.pad_token_id or 0
                sentence_features = [*sentence_features[:2], stack_features(list(sentence_features[2:]), pad)]
            return super().forward(sentence_features, labels)

    return MultiNegativeGISTEmbedLoss


MNRL_TEMPERATURE = 0.05  # scale 20, MultipleNegativesRankingLoss's own default
GIST_TEMPERATURE = 0.01  # GISTEmbedLoss's own default


def loss_temperature(lc: Any) -> float:
    """``loss.temperature``, or the library default of the chosen loss (GIST 0.01, MNRL 0.05 = scale 20)."""
    if lc.temperature is not None:
        return float(lc.temperature)
    return GIST_TEMPERATURE if lc.name in GIST_LOSSES else MNRL_TEMPERATURE


def build_loss(cfg: TrainConfig, student: Any, guide: Any | None) -> Any:
    """The configured sentence-transformers loss (wrapped in MatryoshkaLoss when ``matryoshka_dims`` is set).

    ``guide`` is the module the GIST losses call as their guide (see :func:`guide_module_class`).
    """
    from sentence_transformers.sentence_transformer import losses

    lc = cfg.loss
    temperature = loss_temperature(lc)  # with name none: MNRL's 0.05, for the distillation term
    if lc.name == "none":
        loss = None
    elif lc.name == "gist":
        loss = _multi_negative_gist()(student, guide, temperature=temperature, margin_strategy=lc.margin_strategy,
                                    margin=lc.margin, contrast_anchors=lc.contrast_anchors,
                                    contrast_positives=lc.contrast_positives,
                                    gather_across_devices=lc.gather_across_devices)
    elif lc.name == "cached_gist":
        loss = losses.CachedGISTEmbedLoss(student, guide, temperature=temperature,
                                          mini_batch_size=lc.mini_batch_size, margin_strategy=lc.margin_strategy,
                                          margin=lc.margin, contrast_anchors=lc.contrast_anchors,
                                          contrast_positives=lc.contrast_positives,
                                          gather_across_devices=lc.gather_across_devices)
    elif lc.name == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(student, scale=1.0 / temperature,
                                                   gather_across_devices=lc.gather_across_devices)
    else:
        loss = losses.CachedMultipleNegativesRankingLoss(student, scale=1.0 / temperature,
                                                         mini_batch_size=lc.mini_batch_size,
                                                         gather_across_devices=lc.gather_across_devices)
    if lc.distill is not None:
        from koret.training.distill import (
            build_distill_loss,
            combined_loss_class,
            score_kind_of,
            teacher_scale,
        )

        # the teacher on its own scale: by the kind of scores data.train records (teacher cosines if none)
        scale = teacher_scale(lc.distill, score_kind_of(cfg.data.train), temperature, cfg.data.train)
        distill, factor, targets = build_distill_loss(lc.distill, student, scale)
        return combined_loss_class()(student, loss, distill, factor, targets)
    if lc.matryoshka_dims:
        dim = student.get_embedding_dimension()
        too_big = [d for d in lc.matryoshka_dims if d > dim or d < 1]
        if too_big:
            raise KoretError(f"loss.matryoshka_dims: {too_big} outside 1..{dim} (the model's dimension)")
        dims = sorted(set(lc.matryoshka_dims) | {dim}, reverse=True)  # the full dimension is always trained
        loss = losses.MatryoshkaLoss(student, loss, matryoshka_dims=dims)
    return loss


def build_source_losses(cfg: TrainConfig, student: Any, guide: Any | None, data: TrainData) -> dict[str, Any]:
    """The loss of each source (several sources: the trainer's loss dict, keyed by source name): one loss object
    shared by every source, unless ``loss.distill`` reads sources whose scores are of different kinds (each kind
    puts the teacher on its own scale, :func:`build_loss`)."""
    from koret.training.distill import score_kind_of

    built: dict[str | None, Any] = {}
    losses = {}
    for s in data.sources or []:
        kind = score_kind_of(s.train) if cfg.loss.distill is not None else None
        if kind not in built:
            one = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": s.train, "sources": []})})
            built[kind] = build_loss(one, student, guide)
        losses[s.name] = built[kind]
    return losses


def split_by_anchor(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the anchors with all their rows: no anchor is in both parts (several sources, a
    DatasetDict: of each source, the held-out parts a DatasetDict too)."""
    import random

    if isinstance(dataset, dict):
        from datasets import DatasetDict

        parts = {name: split_by_anchor(d, fraction, seed) for name, d in dataset.items()}
        return DatasetDict({n: p[0] for n, p in parts.items()}), DatasetDict({n: p[1] for n, p in parts.items()})

    anchors = sorted(set(dataset["anchor"]))
    if len(anchors) < 2:
        raise KoretError(f"data.holdout: {len(anchors)} distinct anchor(s); a held-out split needs at least 2")
    held = set(random.Random(seed).sample(anchors, max(1, round(len(anchors) * fraction))))
    is_held = [a in held for a in dataset["anchor"]]
    return (dataset.select([i for i, h in enumerate(is_held) if not h]),
            dataset.select([i for i, h in enumerate(is_held) if h]))


