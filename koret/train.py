"""``koret train``: multi-negative GIST training with a guide model, on one or many processes.

The loss is sentence-transformers' own:

- ``gist`` / ``cached_gist``: GISTEmbedLoss / CachedGISTEmbedLoss (Solatorio, 2024, arXiv:2402.16829). The
  guide model scores every in-batch pair; an in-batch negative the guide rates above the positive (or within
  ``loss.margin`` of it, ``margin_strategy`` absolute or relative, after NV-Retriever, arXiv:2407.15831) is a
  suspected false negative and is masked. ``cached_gist`` adds GradCache (Gao et al., 2021, arXiv:2101.06983):
  global batches in the thousands at the memory of ``loss.mini_batch_size``.
- ``mnrl`` / ``cached_mnrl``: MultipleNegativesRankingLoss without a guide.

Every ``negative_*`` column of the mined ``train.parquet`` is used (several hard negatives per anchor).
``loss.matryoshka_dims`` wraps the loss in MatryoshkaLoss. Training runs through SentenceTransformerTrainer;
``args`` is any field of SentenceTransformerTrainingArguments. Under ``accelerate launch`` / torchrun /
``--num-processes N`` the trainer does data parallelism; ``loss.gather_across_devices`` makes in-batch
negatives span every rank. Only the main process writes outputs.

Outputs in ``args.output_dir``: ``final/`` (the model, with prompts and model-card data), ``checkpoint-*``,
``metrics.json``, ``training.png``, ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from koret import dist
from koret.config import DEFAULT_TRAIN_BATCH, TrainConfig, dump_yaml, unknown_training_args
from koret.data import detect_format, load_retrieval_data, normalize_text, read_table, split_source
from koret.encode import load_sentence_transformer, quiet_transformers, resolve_model_path
from koret.errors import KoretError
from koret.io import atomic_path, read_record, write_json, write_text
from koret.prompts import resolve_prompts, saved_prompts
from koret.report import info, show, table, warn

DEFAULT_ARGS: dict[str, Any] = {
    "output_dir": "runs/train",
    "num_train_epochs": 1,
    "per_device_train_batch_size": DEFAULT_TRAIN_BATCH,
    "learning_rate": 2e-5,
    "batch_sampler": "no_duplicates",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
}
_NEGATIVE = re.compile(r"^negative(?:_(\d+))?$")
GIST_LOSSES = ("gist", "cached_gist")


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class TrainData:
    dataset: Any  # datasets.Dataset with anchor, positive, negative_1..N
    num_negatives: int
    source: str
    mined_config: dict[str, Any] | None  # config.yaml of the koret mine run that wrote data.train


def _mined_config(path: str) -> dict[str, Any] | None:
    p = Path(path)
    loaded = read_record((p if p.is_dir() else p.parent) / "config.yaml")
    return loaded if loaded and "teacher" in loaded and "filter" in loaded else None


def load_train_data(cfg: TrainConfig) -> TrainData:
    """Tuples (``anchor``, ``positive``, ``negative_*``) from a mined file, or pairs through the data layer."""
    from datasets import Dataset

    d = cfg.data
    if not d.train:
        raise KoretError("data.train: required key is missing", "point it at runs/mine/train.parquet")
    path, selection = split_source(d.train)
    fmt = detect_format(path, "data.train") if d.format == "auto" else d.format
    columns: dict[str, list[str]] | None = None
    if selection is None and fmt in ("parquet", "jsonl", "json", "csv", "tsv", "hf_disk"):
        df = read_table(path, fmt, "data.train", d.split)
        if "anchor" in df.columns or any(_NEGATIVE.match(str(c)) for c in df.columns):
            columns = _tuple_columns(df, path)
    if columns is None:
        data = load_retrieval_data(d.train, d.format, query_column=d.query_column, positive_column=d.positive_column,
                                   split=d.split, normalize=d.normalize, limit=d.limit, key="data.train")
        columns = {"anchor": [data.queries[q] for q, _ in data.pairs],
                   "positive": [data.corpus[p] for _, p in data.pairs]}
    elif d.limit is not None:
        columns = {k: v[: d.limit] for k, v in columns.items()}
    if not columns["anchor"]:
        raise KoretError(f"data.train: {d.train}: no rows (empty dataset)")
    n_neg = len(columns) - 2
    return TrainData(Dataset.from_dict(columns), n_neg, d.train, _mined_config(path))


def _tuple_columns(df: Any, path: str) -> dict[str, list[str]]:
    cols = [str(c) for c in df.columns]
    missing = [c for c in ("anchor", "positive") if c not in cols]
    if missing:
        raise KoretError(f"data.train: {path}: column {missing[0]!r} not found; available columns: {', '.join(cols)}",
                         "a mined file has anchor, positive, negative_1..N")
    negs = sorted((c for c in cols if _NEGATIVE.match(c)), key=lambda c: int(_NEGATIVE.match(c).group(1) or 0))
    out: dict[str, list[str]] = {}
    for name in ["anchor", "positive", *negs]:
        values = df[name].tolist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            if _NEGATIVE.match(name):
                raise KoretError(f"data.train: {path}: rows have varying negative counts ({len(bad):,} rows, e.g. row "
                                 f"{bad[0]}, have no {name!r})",
                                 "every row needs the same number of negatives: mine with on_shortage drop")
            raise KoretError(f"data.train: {path}: row {bad[0]} column {name!r} is empty")
        out[name] = [normalize_text(v) for v in values]
    return out


def _ir_evaluator(cfg: TrainConfig, query_prompt: str, passage_prompt: str, batch_size: int) -> Any:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    d = cfg.data
    data = load_retrieval_data(d.eval, d.eval_format, split=d.eval_split, corpus=d.eval_corpus, normalize=d.normalize,
                               key="data.eval")
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
    """A SentenceTransformer; a plain transformers encoder gets ``model.pooling`` + normalization."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    name = cfg.model.name
    if not name:
        raise KoretError("model.name: required key is missing", "a SentenceTransformer or encoder Hub id / folder")
    ref = resolve_model_path(name, "model.name")
    local = Path(ref)
    is_st = (local / "modules.json").exists() if local.is_dir() else _hub_has_modules(ref)
    if is_st:
        model = load_sentence_transformer(name, key="model.name", device=device,
                                          max_seq_length=cfg.model.max_seq_length)
    else:
        quiet_transformers()
        try:
            word = Transformer(ref, max_seq_length=cfg.model.max_seq_length)
        except (OSError, ValueError) as exc:
            raise KoretError(f"model.name: could not load {name!r} as a transformers encoder ({exc})") from exc
        pooling = Pooling(word.get_embedding_dimension(), pooling_mode=cfg.model.pooling)
        model = SentenceTransformer(modules=[word, pooling, Normalize()], device=device)
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


def _guide_module_class() -> type:
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

    ``guide`` is the module the GIST losses call as their guide (see :func:`_guide_module_class`).
    """
    from sentence_transformers.sentence_transformer import losses

    lc = cfg.loss
    temperature = loss_temperature(lc)
    if lc.name == "gist":
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
    if lc.matryoshka_dims:
        dim = student.get_embedding_dimension()
        too_big = [d for d in lc.matryoshka_dims if d > dim or d < 1]
        if too_big:
            raise KoretError(f"loss.matryoshka_dims: {too_big} outside 1..{dim} (the model's dimension)")
        dims = sorted(set(lc.matryoshka_dims) | {dim}, reverse=True)  # the full dimension is always trained
        loss = losses.MatryoshkaLoss(student, loss, matryoshka_dims=dims)
    return loss


# --------------------------------------------------------------------------------------------- args


def build_args(cfg: TrainConfig, columns: list[str], query_prompt: str, passage_prompt: str,
               has_eval: bool) -> Any:
    """SentenceTransformerTrainingArguments from koret's defaults + ``args`` (unknown keys are errors)."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments

    try:
        unknown_training_args(cfg.args, "SentenceTransformerTrainingArguments")  # also checked at validation
    except ValueError as exc:
        raise KoretError(str(exc)) from None
    import transformers

    # 10% warmup: a float warmup_steps on Transformers v5+, warmup_ratio before (deprecated there)
    warmup = {"warmup_steps": 0.1} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": 0.1}
    if "warmup_steps" in cfg.args or "warmup_ratio" in cfg.args:
        warmup = {}
    merged = {**DEFAULT_ARGS, **warmup, **cfg.args}
    merged.pop("resume_from_checkpoint", None)
    if has_eval:
        merged.setdefault("eval_strategy", "steps")
        merged.setdefault("eval_steps", merged.get("save_steps", 500))
    if dist.world_size() > 1:
        # what transformers sets (with a warning on every process) under DDP; koret's VariableSizeBatches keeps
        # the sampler's short batches anyway
        merged.setdefault("dataloader_drop_last", True)
    if not torch.cuda.is_available():
        merged["use_cpu"] = True
        if dist.world_size() > 1:
            merged.setdefault("ddp_backend", "gloo")
    merged["disable_tqdm"] = True  # koret shows its own rich progress
    prompts = {c: (query_prompt if c == "anchor" else passage_prompt) for c in columns}
    if any(prompts.values()):
        merged["prompts"] = prompts
    try:
        return SentenceTransformerTrainingArguments(**merged)
    except (TypeError, ValueError) as exc:
        raise KoretError(f"args: {str(exc).splitlines()[0]}") from exc


# --------------------------------------------------------------------------------------------- callback


def _fault_after_steps() -> int | None:
    """Testing hook: ``KORET_FAULT_AFTER_STEPS=N`` kills the process (SIGKILL) after optimizer step N."""
    raw = os.environ.get("KORET_FAULT_AFTER_STEPS")
    return int(raw) if raw else None


def _callback_class() -> type:
    from transformers import TrainerCallback

    class KoretCallback(TrainerCallback):
        """Rich progress (steps, loss, rate, ETA) and the loss/eval history for metrics.json."""

        def __init__(self) -> None:
            self.logs: list[dict[str, Any]] = []
            self.evals: list[dict[str, Any]] = []
            self.bar: Any = None
            self.task: Any = None
            self.fault = _fault_after_steps()

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            from koret.report import is_quiet, progress

            if state.is_world_process_zero and not is_quiet():
                self._ctx = progress()
                self.bar = self._ctx.__enter__()
                self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                              unit="steps")

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)
            if self.fault is not None and state.global_step >= self.fault:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = dict(logs or {})
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            if "loss" in logs:
                self.logs.append(entry)
                if self.bar is not None and hasattr(self.bar, "log"):  # plain lines off a terminal
                    self.bar.log(self.task, f"loss {logs['loss']:.4f}")
                elif self.bar is not None:
                    self.bar.update(self.task, description=f"train loss {logs['loss']:.4f}")
            elif any(k.startswith("eval_") for k in logs):
                self.evals.append(entry)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self._ctx.__exit__(None, None, None)
                self.bar = None

    return KoretCallback


# --------------------------------------------------------------------------------------------- stage


class VariableSizeBatches:
    """The trainer's batch sampler as several processes should see it.

    With more than one process, transformers turns on ``dataloader_drop_last`` and accelerate's
    ``BatchSamplerShard`` hands out a round of batches only when the round's last batch is full. But
    ``batch_sampler: no_duplicates`` yields short batches wherever texts repeat across rows (hard negatives
    shared by many queries): with drop_last it yields almost nothing, and an epoch silently ended after a step or
    two. This wrapper keeps the short batches (``drop_last`` off), tells accelerate their size varies
    (``batch_size = None``: every process gets its batch of every round), cuts the batches of a round to the
    same size, and yields the same number of batches, a multiple of the process count, so that no process waits
    for another at the end. Every process builds the same seeded sampler, so each knows every round.
    """

    def __init__(self, inner: Any, num_processes: int) -> None:
        self.inner = inner
        self.num_processes = num_processes
        self.batch_size = None
        self.drop_last = False

    def __len__(self) -> int:
        return max(self.num_processes, len(self.inner) // self.num_processes * self.num_processes)

    def __iter__(self) -> Any:
        """Rounds of ``num_processes`` batches, each batch cut to the round's shortest, so every process's batch
        has the same size (losses that gather embeddings across processes need equal shapes)."""
        count, total = 0, len(self)
        while count < total:
            yielded = False
            round_: list[list[int]] = []
            for batch in self.inner:
                yielded = yielded or bool(batch)
                round_.append(list(batch))
                if len(round_) < self.num_processes:
                    continue
                size = min(len(b) for b in round_)
                for b in round_:
                    yield b[:size]
                round_ = []
                count += self.num_processes
                if count >= total:
                    return
            if not yielded:
                return

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


def _shard_short_batches(trainer: Any) -> None:
    make = trainer.get_batch_sampler

    def get_batch_sampler(*args: Any, **kwargs: Any) -> Any:
        kwargs["drop_last"] = False
        sampler = make(*args, **kwargs)
        return VariableSizeBatches(sampler, dist.world_size()) if sampler is not None else None

    trainer.get_batch_sampler = get_batch_sampler


def split_by_anchor(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the anchors with all their rows: no anchor is in both parts."""
    import random

    anchors = sorted(set(dataset["anchor"]))
    if len(anchors) < 2:
        raise KoretError(f"data.holdout: {len(anchors)} distinct anchor(s); a held-out split needs at least 2")
    held = set(random.Random(seed).sample(anchors, max(1, round(len(anchors) * fraction))))
    is_held = [a in held for a in dataset["anchor"]]
    return (dataset.select([i for i, h in enumerate(is_held) if not h]),
            dataset.select([i for i, h in enumerate(is_held) if h]))


def resume_checkpoint(setting: Any, resume: bool, out_dir: Path) -> str | None:
    """The checkpoint to resume from: ``args.resume_from_checkpoint: PATH`` as given (it must exist), or with
    ``--resume`` / ``resume_from_checkpoint: true`` the last checkpoint in the output folder."""
    if isinstance(setting, str) and setting.lower() not in ("true", "false", ""):
        if not Path(setting).is_dir():
            raise KoretError(f"args.resume_from_checkpoint: {setting} is not a checkpoint folder",
                             "give a checkpoint-N folder, or true for the last one in args.output_dir")
        info(f"resuming from {setting}")
        return setting
    if not (resume or setting is True or (isinstance(setting, str) and setting.lower() == "true")):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out_dir)) if out_dir.exists() else None
    if last:
        info(f"resuming from {last}")
        return last
    warn(f"--resume: no checkpoint in {out_dir}; starting from the beginning")
    return None


def _count_tokens(model: Any, dataset: Any, sample: int = 4000) -> float:
    """Tokens per training row (prompts included, truncated at max_seq_length), estimated on a sample."""
    rows = dataset.select(range(min(sample, len(dataset))))
    tok = model.tokenizer
    total = 0
    for col in rows.column_names:
        enc = tok(list(rows[col]), truncation=True, max_length=model.max_seq_length)
        total += sum(len(ids) for ids in enc["input_ids"])
    return total / max(len(rows), 1)


def _peak_memory() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run ``koret train``; returns the metrics (also written to ``metrics.json`` on the main process)."""
    from sentence_transformers import SentenceTransformerTrainer

    started = time.perf_counter()
    data = load_train_data(cfg)
    info(f"[bold]data[/bold] {data.source}: {len(data.dataset):,} rows, {data.num_negatives} negatives per row")
    if cfg.loss.guide not in (None, "teacher", "student"):
        resolve_model_path(cfg.loss.guide, "loss.guide")
    student = load_student(cfg)
    q_prompt, p_prompt = resolve_prompts(student.prompts, cfg.model, "model")
    guide = resolve_guide(cfg, data, student, (q_prompt, p_prompt)) if cfg.loss.name in GIST_LOSSES else None
    guide_desc = guide.description if guide else "none"
    if guide is None and cfg.loss.guide is not None:
        warn(f"loss.guide is ignored by loss {cfg.loss.name!r}")

    dataset, eval_dataset = data.dataset, None
    if cfg.data.holdout > 0:
        dataset, eval_dataset = split_by_anchor(dataset, cfg.data.holdout, int(cfg.args.get("seed", 42)))
    evaluator = _ir_evaluator(cfg, q_prompt, p_prompt, int(cfg.args.get("per_device_eval_batch_size", 32))) \
        if cfg.data.eval else None
    args = build_args(cfg, dataset.column_names, q_prompt, p_prompt, evaluator is not None or eval_dataset is not None)
    out_dir = Path(args.output_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)

    # the model is saved with exactly the prompts it was trained with (sentence-transformers stores model.prompts)
    student.prompts = saved_prompts(q_prompt, p_prompt)
    student.default_prompt_name = None
    card = student.model_card_data
    card.language = ["ko"]
    card.tags = sorted(set((card.tags or []) + ["koret", "korean", "retrieval"]))

    loss = build_loss(cfg, student, _guide_module_class()(guide.model, student) if guide else None)
    callback = _callback_class()()
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                                         loss=loss, evaluator=evaluator, callbacks=[callback])
    if guide is not None:
        trainer.data_collator = GuideCollator(trainer.data_collator, guide)
    if dist.world_size() > 1:
        _shard_short_batches(trainer)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):  # replaced by koret's progress
        trainer.remove_callback(noisy)
    resume_from = resume_checkpoint(cfg.args.get("resume_from_checkpoint"), resume, out_dir)
    tokens_per_row = _count_tokens(student, dataset)
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started

    # every rank takes part in saving (FSDP / DeepSpeed ZeRO-3 gather the weights); only the main one writes
    final = out_dir / "final"
    tmp = out_dir / ".final.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    trainer.save_model(str(tmp))
    dist.barrier()
    if not trainer.is_world_process_zero():
        return {}
    write_text(tmp / "koret.yaml", dump_yaml(cfg))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)

    m = output.metrics
    world = args.world_size
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    samples_per_s = m.get("train_samples_per_second")
    metrics = {
        "loss": cfg.loss.name, "guide": guide_desc, "num_negatives": data.num_negatives,
        "train_rows": len(dataset), "world_size": world, "global_batch_size": global_batch,
        "per_device_batch_size": args.per_device_train_batch_size, "epochs": args.num_train_epochs,
        "learning_rate": args.learning_rate, "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "steps": output.global_step, "final_loss": callback.logs[-1]["loss"] if callback.logs else m.get("train_loss"),
        "train_loss": m.get("train_loss"), "train_runtime": m.get("train_runtime"),
        "samples_per_second": samples_per_s, "steps_per_second": m.get("train_steps_per_second"),
        "tokens_per_second": samples_per_s * tokens_per_row if samples_per_s else None,
        "tokens_per_row": tokens_per_row, "wall_seconds": wall, "resumed_from": resume_from,
        "device": str(student.device), "loss_curve": callback.logs, "eval": callback.evals, **_peak_memory(),
        "base_model": cfg.model.name, "data": data.source,
    }
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "config.yaml", dump_yaml(cfg))
    _plot(out_dir / "training.png", callback.logs, callback.evals)
    rows = [["loss", f"{cfg.loss.name} (guide: {guide_desc})"], ["rows x negatives", f"{len(dataset):,} x "
            f"{data.num_negatives}"], ["world size / global batch", f"{world} / {global_batch}"],
            ["steps", output.global_step], ["final loss", metrics["final_loss"]],
            ["samples/s", samples_per_s or float("nan")], ["tokens/s", metrics["tokens_per_second"] or float("nan")]]
    for e in callback.evals[-1:]:
        rows += [[k.replace("eval_", "", 1), v] for k, v in e.items() if "ndcg@10" in k or "mrr@10" in k]
    rows += [["wall seconds", wall], ["model", str(final)]]
    show(table(f"koret train: {out_dir}", ["", "value"], rows))
    return metrics


def _plot(path: Path, logs: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if logs:
        ax.plot([e["step"] for e in logs], [e["loss"] for e in logs], color="#264653", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    keys = sorted({k for e in evals for k in e if k.endswith("ndcg@10") or k == "eval_loss"})
    if keys:
        ax2 = ax.twinx()
        for key, color in zip(keys, ["#e76f51", "#2a9d8f", "#e9c46a"], strict=False):
            pts = [(e["step"], e[key]) for e in evals if key in e]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=key)
        ax2.set_ylabel("eval")
        ax2.legend(loc="upper right")
    if logs:
        ax.legend(loc="upper left")
    ax.set_title("koret train")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
