"""YAML configs shared by every stage: schema, ``--set`` overrides, validation with one-line errors.

Each stage reads one YAML file (``koret mine -c configs/mine.yaml``). ``--set dotted.key=value`` overrides any
key; the value is parsed as a YAML scalar or list (``--set filter.perc=0.9``, ``--set search.top_k=200``).
Validation is pydantic's: a wrong type, a missing required key or an unknown key (with a "did you mean"
suggestion) raises :class:`~koret.errors.KoretError` naming the file and the dotted key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from koret.errors import KoretError

FILTER_STRATEGIES = ("naive", "shifted", "abs", "margin_pos", "perc_pos")
DATA_FORMATS = (
    "auto", "jsonl", "json", "csv", "tsv", "parquet", "hf_disk", "hub", "squad", "beir", "autorag", "text", "mteb",
)


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must be >= 0 (a negative margin would count scores above the positive as negatives)")
    return value


Margin = Annotated[float, AfterValidator(_non_negative)]


def _dropout_range(value: float | str | None) -> float | str | None:
    if isinstance(value, float) and not 0 <= value < 1:
        raise ValueError("a dropout is in [0, 1)")
    return value


# model.attention_dropout of koret train and koret train-reranker (koret.training.attention)
AttentionDropout = Annotated[float | Literal["auto"] | None, AfterValidator(_dropout_range)]


def attention_dropout_field(measured: str) -> Any:
    """The ``model.attention_dropout`` field; ``measured``: what the trainer's own run measured on CPU."""
    return Field("auto", description=(
        "Dropout of the attention probabilities while training. auto: 0 on CPU, where PyTorch's fused attention "
        f"takes no dropout and would otherwise keep every head's L x L matrices for backward ({measured}), the "
        "model's own on GPUs (whose fused kernels take dropout); null: the model's own (0.1 for BERT / XLM-R); "
        "or a number in [0, 1). Checkpoints and final/ keep the model's own value; metrics.json records the one "
        "trained with."))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptFields(Section):
    """Prompt keys shared by teacher, student and eval models (the rule is in :mod:`koret.prompts`)."""

    query_prompt: str | None = Field(None, description="Query prompt text, used as written (e.g. 'query: ').")
    query_prompt_name: str | None = Field(None, description="Name of one of the model's prompts, for queries.")
    passage_prompt: str | None = Field(None, description="Passage prompt text, used as written.")
    passage_prompt_name: str | None = Field(None, description="Name of one of the model's prompts, for passages. "
                                                              "Neither set: the model's 'query' / 'document' prompts.")

    @model_validator(mode="after")
    def _name_or_text(self) -> PromptFields:
        for side in ("query", "passage"):
            if getattr(self, f"{side}_prompt") is not None and getattr(self, f"{side}_prompt_name") is not None:
                raise ValueError(f"{side}_prompt and {side}_prompt_name are both set: set one")
        return self


DTYPES = ("auto", "float32", "float16", "bfloat16")


class SourceFields(Section):
    """The (query, positive) source of a data section: the one shape mine, train and train-reranker share, and
    what :func:`koret.data.load_section` reads."""

    train: str | None = Field(None, description="(query, positive) source: file, folder or Hub dataset id; for "
                                                "train / train-reranker also koret mine's train.parquet.")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    query_column: str | None = None
    positive_column: str | None = None
    split: str = Field("train", description="Split of a Hub dataset, or qrels/<split>.tsv of a BEIR folder.")
    normalize: Literal["nfc", "none"] = "nfc"
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    sample: int | None = Field(None, ge=1, description="Use N (query, positive) rows drawn at random from the whole "
                                                       "source (seeded by sample_seed; kept in source order), "
                                                       "instead of limit's first N: a small run then sees every "
                                                       "part of the source. From pairs data a drawn query brings "
                                                       "all its positives (a few more rows than N) and mining still "
                                                       "searches the whole corpus.")
    sample_seed: int = Field(0, ge=0, description="Seed of data.sample's draw.")

    @model_validator(mode="after")
    def _limit_or_sample(self) -> SourceFields:
        if self.limit is not None and self.sample is not None:
            raise ValueError("data.limit and data.sample are both set: limit takes the first N rows, sample draws N "
                             "from the whole source; keep one")
        return self


SOURCE_NAME = re.compile(r"[\w.-]+")
SAMPLERS = ("proportional", "round_robin")


class NamedSource(Section):
    """The name every entry of ``data.sources`` has (its rules are in :mod:`koret.sources`)."""

    name: str = Field(description="The source's name, unique in the list (letters, digits, _ . -): "
                                  "train.parquet's source column, stats.json, the logs and the model card use it.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not SOURCE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a source name: use letters, digits, _ . - (no spaces)")
        return value


class WeightedSource(NamedSource):
    weight: float = Field(1.0, description="Sampling weight (data.sampler proportional): a source's share of the "
                                           "batches is proportional to weight x its batches. Must be > 0.")

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, value: float) -> float:
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError("must be a finite number > 0 (leave a source out of the list to skip it)")
        return value


class MineSourceConfig(SourceFields, NamedSource):
    """One named source of koret mine: (query, positive) data and its own extra passages. Its negatives come only
    from its own passages (its positives and its corpus) and from data.corpus when set (shared by all sources)."""

    corpus: str | None = Field(None, description="This source's extra passages (negative candidates of its "
                                                 "queries only).")
    corpus_format: Literal[DATA_FORMATS] = Field("auto", description="Layout of this source's corpus.")  # type: ignore[valid-type]
    corpus_column: str | None = Field(None, description="Column of this source's corpus holding the passage text.")


class SourcePromptFields(PromptFields):
    """A source's own prompts for the model being trained; a side left unset takes the model section's."""

    query_prompt: str | None = Field(None, description="Anchor prompt text for this source's batches (e.g. an "
                                                       "instruction); unset: the model section's.")
    query_prompt_name: str | None = Field(None, description="Or the name of one of the model's prompts.")
    passage_prompt: str | None = Field(None, description="Prompt text of this source's positives and negatives; "
                                                         "unset: the model section's.")
    passage_prompt_name: str | None = Field(None, description="Or the name of one of the model's prompts.")


class TrainSourceConfig(SourceFields, SourcePromptFields, WeightedSource):
    """One named source of koret train: its batches hold only its rows (in-batch negatives never cross sources),
    drawn as data.sampler says, encoded with its own prompts. A mined train.parquet with a source column gives
    the rows whose source is this name."""


class RerankerSourceConfig(SourceFields, WeightedSource):
    """One named source of koret train-reranker: its batches hold only its rows, drawn as data.sampler says. A
    mined train.parquet with a source column gives the rows whose source is this name."""


def check_sources(section: Any, allowed: set[str]) -> None:
    """The rules of ``data.sources`` every stage shares: not with ``data.train``, no section-level source key
    beside it (it would be ignored), unique names, and weights only where the sampler reads them."""
    sources = getattr(section, "sources", None) or []
    if not sources:
        return
    if section.train is not None:
        raise ValueError("train and sources are both set: train is the one-source shorthand; give each source's "
                         "file as its entry's train")
    # a key counts as given when it differs from its default: a resolved config.yaml writes every key
    ignored = [k for k, f in SourceFields.model_fields.items()
               if k not in allowed and k != "train" and getattr(section, k) != f.default]
    if ignored:
        raise ValueError(f"{ignored[0]} and sources are both set: with sources, give each source's {ignored[0]} in "
                         "its entry")
    seen: set[str] = set()
    for s in sources:
        if s.name in seen:
            raise ValueError(f"sources: the name {s.name!r} is given twice; names must differ")
        seen.add(s.name)
    if getattr(section, "sampler", "proportional") == "round_robin":
        weighted = next((s for s in sources if getattr(s, "weight", 1.0) != 1.0), None)
        if weighted is not None:
            raise ValueError(f"sources: {weighted.name} has weight {weighted.weight:g}, and sampler round_robin takes "
                             "turns without weights: use sampler proportional, or drop the weights")


class DataConfig(SourceFields):
    corpus: str | None = Field(None, description="Extra passages that are negative candidates besides the positives "
                                                 "(with data.sources: shared by every source).")
    corpus_format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    corpus_column: str | None = None
    sources: list[MineSourceConfig] = Field(
        default_factory=list, description="Several named sources mined in one run instead of data.train: each "
        "source's negatives come only from its own passages (and data.corpus), train.parquet keeps a source "
        "column, stats.json counts per source and in total.")

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        check_sources(self, allowed={"normalize"})  # normalize: of data.corpus, shared by the sources
        return self


class TeacherConfig(PromptFields):
    model: str | None = Field(None, description="SentenceTransformer: Hub id or local folder.")
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(None, ge=8)
    dtype: Literal[DTYPES] = Field("auto", description="auto: bfloat16 on a GPU that supports it, else float32.")  # type: ignore[valid-type]
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: the best available).")


class EncodeConfig(Section):
    shard_size: int = Field(10_000, ge=1, description="Passages per cached embedding shard.")
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="How cached embeddings are stored: float16 halves disk and memory (scores are "
                               "still exact float32 products of the stored values).")
    verify: bool = Field(False, description="Recompute each cached shard's checksum when it is loaded (reads "
                                            "every byte); by default a load checks header, shape and length.")


class LexicalConfig(Section):
    """Korean BM25 candidates added to the dense ones (:mod:`koret.lexical`); each is scored by the teacher."""

    method: Literal["bm25"] = "bm25"
    tokenizer: Literal["kiwi"] = Field("kiwi", description="Kiwi morphemes (kiwipiepy): nouns, stems, roots, "
                                                          "foreign words, numbers.")
    top_k: int = Field(50, ge=1, description="BM25 candidates per query, added to search.top_k dense ones.")
    k1: float = Field(1.5, gt=0)
    b: float = Field(0.75, ge=0, le=1)


class SearchConfig(Section):
    backend: Literal["auto", "faiss", "torch"] = "auto"
    index: str = Field("Flat", description="FAISS index_factory string (Flat, IVF4096,Flat, HNSW32, IVF1024,PQ32 ...).")
    top_k: int = Field(100, ge=1)
    query_chunk_size: int = Field(4096, ge=1)
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Candidate selection precision (torch backend); scores are always rescored in float32. "
                            "auto: float16 on CUDA, float32 elsewhere.")
    nprobe: int | None = Field(None, ge=1, description="IVF cells probed per query (FAISS IVF indexes).")
    train_sample: int = Field(262_144, ge=1000, description="Vectors sampled to train a non-Flat FAISS index.")
    lexical: LexicalConfig | None = Field(None, description="Also take BM25 candidates over Kiwi morphemes.")


class RescoreConfig(Section):
    model: str | None = Field(None, description="Optional CrossEncoder (Hub id or local folder).")
    batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=8)


class FilterConfig(Section):
    strategy: Literal[FILTER_STRATEGIES] = Field(  # type: ignore[valid-type]
        "naive", description="The false-negative rule: naive (the default, with max_overlap 0.9: the measured best, "
        "docs/quality.md), shifted, abs, margin_pos, perc_pos (NV-Retriever's).")
    margin: Margin = Field(0.05, description="margin_pos: drop a candidate scoring above positive - margin.")
    perc: float = Field(0.95, gt=0, le=1.5, description="perc_pos: drop a candidate scoring above positive x perc.")
    max_score: float | None = Field(None, description="Drop candidates scoring above this (abs strategy, or any).")
    min_score: float | None = Field(None, description="Drop candidates scoring below this.")
    range_min: int = Field(0, ge=0, description="Skip the first range_min ranks (shifted strategy).")
    range_max: int | None = Field(None, ge=1, description="Consider only the first range_max ranks.")
    num_negatives: int = Field(7, ge=1)
    sampling: Literal["top", "random"] = "top"
    seed: int = 42
    on_shortage: Literal["drop", "pad_random"] = "drop"
    scale: Literal["raw", "calibrated"] = Field(
        "raw", description="What perc, margin, max_score and min_score apply to: the raw scores, or the teacher's "
        "calibrated ones (0 = its mean score of random pairs, 1 = its median positive; measured by koret mine).")
    max_overlap: float | None = Field(
        0.9, gt=0, le=1, description="Drop a candidate whose text nearly duplicates one of its query's positives: "
        "character 3-gram overlap (whitespace and case ignored) above this; null: off. Any strategy.")
    candidates: str | None = Field(
        None, description="koret filter: candidates.parquet (or its folder). Default: <output.dir>/candidates.parquet."
    )

    @model_validator(mode="after")
    def _consistent(self) -> FilterConfig:
        """The cross-key rules of :meth:`koret.filter_rules.FilterSettings.check` (abs needs max_score, ...)."""
        from koret.filter_rules import FilterSettings

        try:
            FilterSettings.from_config(self).check()
        except KoretError as exc:
            raise ValueError(str(exc)) from None
        return self


class OutputConfig(Section):
    dir: str = "runs/mine"


class MineConfig(Section):
    """Config of ``koret mine`` and ``koret filter`` (filter reads only ``filter`` and ``output``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    rescore: RescoreConfig = Field(default_factory=RescoreConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cache_dir: str = Field("~/.cache/koret", description="Embedding shard cache.")

    @model_validator(mode="after")
    def _negatives_fit_candidates(self) -> MineConfig:
        if self.filter.num_negatives > self.search.top_k:
            raise ValueError(
                f"filter.num_negatives ({self.filter.num_negatives}) is larger than search.top_k "
                f"({self.search.top_k}): raise search.top_k or lower filter.num_negatives"
            )
        return self


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


class LoraSettings(Section):
    """LoRA through peft (``model.lora``): only the adapter's weights train, the base stays frozen
    (:mod:`koret.training.lora`)."""

    r: int = Field(16, ge=1, description="Rank of the adapter's update matrices.")
    alpha: float = Field(32.0, gt=0, description="Scale of the update: it is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | None = Field(
        None, description="Names (or name suffixes) of the linear layers that get an adapter, e.g. [q_proj, v_proj]. "
                          "null: every linear layer of the transformer blocks (peft's all-linear: q/k/v/o and MLP "
                          "projections of a decoder, query/key/value/dense of BERT); a reranker's new score head "
                          "trains in full.")
    merge: bool = Field(True, description="Also save merged weights in final/ (they load without peft; what koret "
                                          "push uploads); the adapter alone is in final/adapter. false: final/ is "
                                          "the adapter (loading it needs peft and the base model).")

    @field_validator("target_modules")
    @classmethod
    def _named(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not str(t).strip() for t in v)):
            raise ValueError("must be a non-empty list of module names (or null for every linear layer)")
        return v


class ModelConfig(PromptFields):
    """The student. Its query prompt is used for the anchor column, its passage prompt for positive/negatives;
    the trained model is saved with exactly these prompts."""

    name: str | None = Field(None, description="SentenceTransformer or plain transformers model (Hub id or folder).")
    max_seq_length: int | None = Field(None, ge=8)
    pooling: Literal["mean", "cls", "lasttoken"] = Field(
        "mean", description="Pooling for a plain transformers model (a SentenceTransformer keeps its own). "
                            "lasttoken: the last token's state, for a causal LM (decoder embedders): texts are "
                            "left-padded and end with the tokenizer's EOS token, saved with the model.")
    attention_dropout: AttentionDropout = attention_dropout_field(
        "all-MiniLM-L6-v2, mnrl, 16 x (query, positive, 3 negatives) cut at 256 tokens: 4.7 GB peak, not 8.8")
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = Field(  # type: ignore[valid-type]
        "auto", description="Attention kernel. auto: flash_attention_2 on a GPU where flash-attn is installed and "
                            "the weights are 16-bit, else sdpa (PyTorch's fused attention), else the model's own.")
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="Weights of the loaded student. auto: bfloat16 for the frozen base of a LoRA run on a "
                            "GPU that supports it (the adapter trains in float32), else float32.")
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter instead of every weight (needs "
                                                         "peft), e.g. {r: 16}.")


class TrainingSourcesFields(SourceFields):
    """A training data section's source keys plus the batch sampler of several sources (``sources`` is each
    section's own: its entries' keys differ)."""

    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        "proportional", description="Which source each batch comes from: proportional (seeded draw, a source's "
        "share of the batches proportional to weight x its batches) or round_robin (sources in turn, until one "
        "runs out). Also splits a mined train.parquet with a source column.")

    @model_validator(mode="after")
    def _sources(self) -> TrainingSourcesFields:
        check_sources(self, allowed=set())
        return self


class TrainDataConfig(TrainingSourcesFields):
    eval: str | None = Field(None, description="IR set evaluated during training (pairs, SQuAD, BEIR, AutoRAG).")
    eval_format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    eval_split: str = "test"
    eval_corpus: str | None = Field(None, description="Extra passages for the eval corpus.")
    eval_max_queries: int | None = Field(None, ge=1)
    holdout: float = Field(0.0, ge=0.0, lt=0.5, description="Fraction of training tuples held out for eval loss "
                                                            "(with several sources: of each source's).")
    sources: list[TrainSourceConfig] = Field(
        default_factory=list, description="Several named sources instead of data.train: every batch holds rows of "
        "one source (sentence-transformers' multi-dataset training), each source with its own prompts and weight.")


class DistillConfig(Section):
    """Distillation from the teacher scores in ``train.parquet``'s ``scores`` column (:mod:`koret.training.distill`)."""

    name: Literal["kl", "margin_mse"] = Field("kl", description="kl: DistillKLDivLoss over (positive, negatives); "
                                                                "margin_mse: MarginMSELoss on positive - negative.")
    weight: float = Field(1.0, gt=0, description="Added to the contrastive loss with this weight.")
    temperature: float | None = Field(None, gt=0, description="The student's cosines are divided by it before they "
                                                                "are compared. Default: the contrastive loss's "
                                                                "temperature (0.05 with name none).")
    teacher_temperature: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="The teacher's scores are divided by it. Default by the kind of scores the mined data records: "
                    "teacher cosines: temperature (above); cross-encoder logits, or their sigmoid (read back as "
                    "logits): 1.0 for kl, required for margin_mse; another kind, or a file that records none and "
                    "whose scores leave [-1, 1]: required.")


class LossConfig(Section):
    name: Literal["gist", "cached_gist", "mnrl", "cached_mnrl", "none"] = Field(
        "cached_gist", description="The contrastive loss; none: loss.distill alone.")
    guide: str | None = Field(
        None,
        description="Guide model for GIST: a Hub id or folder, 'teacher' (the mining teacher), 'student' (a frozen "
                    "copy of the initial model). Default: the teacher when the data came from koret mine, else student.",
    )
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    margin: Margin = 0.0
    temperature: float | None = Field(None, gt=0, description="Default: the loss's own (GIST 0.01; MNRL 0.05, "
                                                                    "i.e. scale 20).")
    contrast_anchors: bool = True
    contrast_positives: bool = True
    mini_batch_size: int = Field(32, ge=1, description="GradCache mini-batch (cached losses).")
    gather_across_devices: bool = False
    matryoshka_dims: list[int] | None = Field(None, description="Wrap the loss in MatryoshkaLoss over these dims.")
    distill: DistillConfig | None = Field(None, description="Add (or, with name none, use only) distillation from "
                                                            "the teacher scores of the mined data.")

    @model_validator(mode="after")
    def _distill_consistent(self) -> LossConfig:
        if self.name == "none" and self.distill is None:
            raise ValueError("name none trains with loss.distill alone, which is not set: set loss.distill, e.g. "
                             "{name: kl}, or choose a contrastive loss")
        if self.distill is not None and self.matryoshka_dims:
            raise ValueError("loss.distill cannot be combined with matryoshka_dims yet: drop one of them")
        return self


class TrainConfig(Section):
    """Config of ``koret train``; ``args`` passes through to SentenceTransformerTrainingArguments."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    args: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str = "~/.cache/koret"

    @model_validator(mode="after")
    def _args_and_batch(self) -> TrainConfig:
        unknown_training_args(self.args, "SentenceTransformerTrainingArguments")
        batch = int(self.args.get("per_device_train_batch_size", DEFAULT_TRAIN_BATCH))
        if self.loss.name.startswith("cached") and self.loss.mini_batch_size > batch:
            raise ValueError(f"loss.mini_batch_size ({self.loss.mini_batch_size}) is larger than the batch "
                             f"(args.per_device_train_batch_size = {batch}): lower loss.mini_batch_size or raise "
                             "the batch")
        return self


DEFAULT_TRAIN_BATCH = 32


def training_argument_names(class_name: str) -> set[str]:
    """Field names of sentence-transformers' training arguments class (imported only when asked)."""
    import dataclasses

    import sentence_transformers

    return {f.name for f in dataclasses.fields(getattr(sentence_transformers, class_name))}


def unknown_training_args(args: dict[str, Any], class_name: str) -> None:
    """A ValueError naming the first ``args.*`` key the trainer's arguments do not have, with a suggestion."""
    known = training_argument_names(class_name)
    for key in args:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean 'args.{close[0]}'?" if close else ""
            raise ValueError(f"unknown key 'args.{key}'{hint} (args takes the fields of {class_name})")


class RerankerModelConfig(Section):
    name: str | None = Field(None, description="CrossEncoder (Hub id or folder, e.g. BAAI/bge-reranker-v2-m3), a "
                                               "plain encoder that gets a new one-logit head, or a causal LM scored "
                                               "by its 'yes' / 'no' logits (as Qwen3-Reranker).")
    max_length: int | None = Field(None, ge=8, description="Max tokens of a (query, passage) pair; longer pairs "
                                                            "are cut, the longer text first. null: 512, or the "
                                                            "model's own maximum when smaller. Batches are padded "
                                                            "to their longest pair: short pairs cost their length.")
    attention_dropout: AttentionDropout = attention_dropout_field(
        "all-MiniLM-L6-v2, 16 pairs of 512 tokens: 2.9 GB peak, not 9.8")
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = Field(  # type: ignore[valid-type]
        "auto", description="Attention kernel. auto: flash_attention_2 on a GPU where flash-attn is installed and "
                            "the weights are 16-bit, else sdpa, else the model's own.")
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="Weights of the loaded reranker. auto: bfloat16 for the frozen base of a LoRA run on a "
                            "GPU that supports it, else float32.")
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter instead of every weight (needs "
                                                         "peft); the new score head, if any, trains in full.")


class RerankerDataConfig(TrainingSourcesFields):
    eval: str | None = Field(None, description="koret mine's output folder for held-out queries (or its "
                                               "train.parquet / candidates.parquet): during training the reranker "
                                               "reorders each one's retrieved top-k (candidates.parquet); base_*: "
                                               "the retriever's order (NDCG@10).")
    eval_max_queries: int | None = Field(None, ge=1)
    num_negatives: int | None = Field(None, ge=1, description="Hard negatives per query (default: every "
                                                              "negative_* column of a mined train.parquet; 7 "
                                                              "from a candidates.parquet).")
    sources: list[RerankerSourceConfig] = Field(
        default_factory=list, description="Several named sources instead of data.train: every batch holds rows of "
        "one source (sentence-transformers' multi-dataset training), each with its weight.")


class RerankerLossConfig(Section):
    name: Literal["mnrl", "cached_mnrl", "bce", "lambda", "listnet", "margin_mse"] = "mnrl"
    pos_weight: float | None = Field(None, gt=0, description="bce: weight of the positive class (e.g. the number "
                                                             "of negatives per positive).")
    scale: float = Field(10.0, gt=0, description="mnrl / cached_mnrl: logits are scaled by this (the library's "
                                                 "default).")
    in_batch_negatives: int | None = Field(4, ge=1, description="mnrl / cached_mnrl: other queries' passages used "
                                                                "as extra negatives per query (None: all).")
    mini_batch_size: int = Field(32, ge=1, description="cached_mnrl: GradCache mini-batch.")


class RerankerConfig(Section):
    """Config of ``koret train-reranker``; ``args`` passes through to CrossEncoderTrainingArguments."""

    model: RerankerModelConfig = Field(default_factory=RerankerModelConfig)
    data: RerankerDataConfig = Field(default_factory=RerankerDataConfig)
    loss: RerankerLossConfig = Field(default_factory=RerankerLossConfig)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_args(self) -> RerankerConfig:
        unknown_training_args(self.args, "CrossEncoderTrainingArguments")
        return self


class EvalModelConfig(PromptFields):
    name: str = Field(description="SentenceTransformer: Hub id, local folder or pkg:PACKAGE/folder.")
    label: str | None = Field(None, description="Name in tables (default: the folder or Hub id).")
    max_seq_length: int | None = Field(None, ge=8)
    batch_size: int = Field(64, ge=1)
    dtype: Literal[DTYPES] = Field("auto", description="auto: bfloat16 on a GPU that supports it, else float32.")  # type: ignore[valid-type]


class EvalDataConfig(Section):
    """One test set: ``data:`` (a single set) or an entry of ``sets:`` (a suite)."""

    name: str | None = Field(None, description="The set's name in tables, metrics.json and metrics.csv (default: "
                                               "its folder or file stem).")
    path: str | None = Field(None, description="IR set: pairs, SQuAD (file.json#A:B), BEIR folder, AutoRAG, a Hub "
                                               "dataset id (format hub, or mteb: an MTEB task's dataset).")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    split: str = Field("test", description="qrels/<split>.tsv of a BEIR folder, or a Hub split.")
    subset: str | None = Field(None, description="Config of a Hub dataset; format mteb: the task's subset (ko, "
                                                 "korean, kor_Hang-kor_Hang; none for a one-language task).")
    revision: str | None = Field(None, description="Revision (commit, tag or branch) of a Hub dataset (default: "
                                                   "its main branch).")
    query_column: str | None = None
    positive_column: str | None = None
    corpus: str | None = Field(None, description="Extra passages added to the corpus.")
    corpus_format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    corpus_column: str | None = None
    normalize: Literal["nfc", "none"] = "nfc"
    max_queries: int | None = Field(None, ge=1)


class EvalSearchConfig(Section):
    backend: Literal["auto", "faiss", "torch"] = "auto"
    query_chunk_size: int = Field(4096, ge=1)
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Candidate selection precision; scores are always exact float32.")


class EvalOutputConfig(Section):
    dir: str = "runs/eval"
    markdown: str | None = Field(None, description="Also write the table as Markdown to this file.")


class EvalRerankerConfig(Section):
    name: str = Field(description="CrossEncoder reranker: Hub id, local folder (e.g. runs/reranker/final).")
    label: str | None = Field(None, description="Name in tables (default: the folder or Hub id).")
    max_length: int | None = Field(None, ge=8)
    batch_size: int = Field(32, ge=1)


class SignificanceConfig(Section):
    """Paired comparison of every model with the baseline (:mod:`koret.significance`)."""

    resamples: int = Field(10_000, ge=0, description="Bootstrap and randomization resamples; 0 turns it off.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the bootstrap confidence interval.")
    seed: int = 0


class EvalConfig(Section):
    """Config of ``koret eval``: the first model is the baseline the others are compared with; each reranker
    reorders the first model's top ``rerank_top_k``; with ``sets``, on every set, then on their macro average."""

    data: EvalDataConfig = Field(default_factory=EvalDataConfig)  # one set; several: sets
    sets: list[EvalDataConfig] = Field(
        default_factory=list, description="A suite of test sets instead of data (each entry has data's keys; "
        "names must differ): every model on every set, then the macro average over the sets, each delta with "
        "its interval and p-value.")
    models: list[EvalModelConfig] = Field(default_factory=list)
    rerankers: list[EvalRerankerConfig] = Field(default_factory=list)
    rerank_top_k: int = Field(100, ge=1, description="Passages of the reranked model's ranking each reranker reorders.")
    rerank_model: str | None = Field(None, description="Label of the model whose ranking the rerankers reorder "
                                                       "(default: the first model).")
    k: list[int] = Field(default_factory=lambda: [1, 3, 5, 10, 20, 100])
    search: EvalSearchConfig = Field(default_factory=EvalSearchConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    output: EvalOutputConfig = Field(default_factory=EvalOutputConfig)
    significance: SignificanceConfig = Field(default_factory=SignificanceConfig)
    mteb: list[str] | None = Field(None, description="MTEB Korean retrieval tasks to run too (needs the Hub).")
    cache_dir: str = "~/.cache/koret"

    @field_validator("k")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("must be a non-empty list of positive integers")
        return sorted(set(value))

    @model_validator(mode="after")
    def _data_or_sets(self) -> EvalConfig:
        # data's keys would be ignored without a word; a key counts as given when it differs from its default (a
        # resolved config, e.g. koret run's chain, holds every key)
        given = [k for k, f in EvalDataConfig.model_fields.items() if getattr(self.data, k) != f.default]
        if self.sets and given:
            key = "path" if "path" in given else given[0]
            raise ValueError(f"data.{key} and sets are both set: give one set as data, or several as sets with "
                             "each set's keys in its entry")
        return self


class DatasetPushConfig(Section):
    """The mined data as a Hub dataset repo (``koret push --dataset DIR``, or ``dataset:`` in a push config):
    pushed instead of the model, with a dataset card of the mining facts."""

    repo_id: str | None = Field(None, description="owner/name of the dataset repo on the Hugging Face Hub.")
    mine_dir: str | None = Field(None, description="The folder koret mine or koret filter wrote (default: "
                                                   "push.mine_dir, else runs/mine).")
    license: str | None = Field(None, description="License of every source (a Hub license id, e.g. cc-by-sa-4.0). "
                                                  "A license is required for each source: this, or licenses.")
    licenses: dict[str, str] = Field(default_factory=dict, description="License per source: data.sources' names "
                                     "(a one-source mine: its file's stem), and data.corpus for shared extra "
                                     "passages. Overrides license.")
    candidates: bool = Field(False, description="Also upload candidates.parquet and corpus.parquet: every query's "
                                                "candidates with the teacher's scores.")
    commit_message: str = "Upload hard negatives mined with koret"
    dry_run_dir: str = Field("runs/push-dataset", description="Where a dry run of koret push -c stages the dataset.")

    @field_validator("licenses", mode="before")
    @classmethod
    def _dotted_names(cls, value: Any) -> Any:
        """A source name with a dot (``data.corpus``) given as ``--set dataset.licenses.data.corpus=...`` arrives
        nested ({data: {corpus: ...}}): its keys are joined back into the name."""
        def flat(node: Any, prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        return flat(value, "") if isinstance(value, dict) else value


class PushConfig(Section):
    """Config of ``koret push`` (the token is never part of it: HF_TOKEN or huggingface-cli login)."""

    repo_id: str | None = Field(None, description="owner/name on the Hugging Face Hub.")
    model: str = Field("runs/train/final", description="The trained folder: a SentenceTransformer (retriever) or a "
                                                     "CrossEncoder (reranker, pushed with a reranker card).")
    private: bool = False
    revision: str | None = Field(None, description="Branch to push to (created if missing).")
    commit_message: str = "Upload Korean retriever trained with koret"
    create_repo: bool = True
    license: str | None = Field(None, description="License in the card (default: other).")
    datasets: list[str] | None = Field(None, description="Hub dataset ids for the card.")
    train_dir: str | None = Field(None, description="koret train output (default: the model folder's parent).")
    mine_dir: str | None = Field(None, description="koret mine output (default: from the train config).")
    eval_dir: str | None = Field(None, description="koret eval output whose metrics.json goes in the card.")
    retries: int = Field(3, ge=0, le=10)
    dry_run: bool = Field(False, description="Stage the folder instead of uploading (koret run: into <run.dir>/push).")
    dry_run_dir: str = Field("runs/push", description="Where koret push -c writes the staged folder in a dry run.")
    dataset: DatasetPushConfig | None = Field(None, description="Push the mined data as a Hub dataset repo instead "
                                                                "of the model (koret push only, not koret run).")


C = TypeVar("C", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-4`` is a number, not the string "1e-4" (YAML 1.1 wants
    ``1.0e-4``), so ``learning_rate: 1e-4`` in a file or ``--set`` means what it says."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML (``0.9``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise KoretError(f"--set {item!r}: expected dotted.key=value", "e.g. --set filter.perc=0.9")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise KoretError(f"--set {item!r}: empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``dotted.key=value`` override applied."""
    data = json.loads(json.dumps(raw, default=str)) if raw else {}
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing, unreadable or malformed file."""
    p = Path(path)
    if not p.exists():
        raise KoretError(f"{p}: config file not found", "check the path given to -c")
    if p.is_dir():
        raise KoretError(f"{p}: is a folder, expected a YAML file")
    try:
        loaded = load_yaml_text(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KoretError(f"{p}:{where}: invalid YAML: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KoretError(f"{p}: cannot read config: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise KoretError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
    return loaded


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model that holds the key at ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def format_validation_error(source: str, model: type[BaseModel], exc: ValidationError) -> str:
    """One line naming the source and the first offending dotted key, with a suggestion for typos."""
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        known = _fields_at(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))!r}?" if close else ""
        allowed = f" (allowed: {', '.join(known)})" if known and not close else ""
        return f"{source}: unknown key {key!r}{hint}{allowed}"
    if kind == "missing":
        return f"{source}: {key}: required key is missing"
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = err.get("input")
    shown = "" if isinstance(value, dict) or kind.startswith("value_error") else f" (got {value!r})"
    if not loc:
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}{shown}"


def validate(model: type[C], raw: dict[str, Any], source: str = "config") -> C:
    """Validate a raw mapping into ``model``; errors become one-line :class:`KoretError`."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise KoretError(format_validation_error(source, model, exc)) from exc


def load_config(model: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML at ``path`` (or start empty), apply ``--set`` overrides, validate into ``model``."""
    raw = read_yaml(path) if path is not None else {}
    merged = apply_overrides(raw, overrides)
    source = str(path) if path is not None else "--set"
    return validate(model, merged, source)


STAGE_KEYS = {  # top-level keys that tell one stage's config from the others'
    "mine": {"teacher", "rescore"},
    "train": {"loss", "args"},
    "eval": {"models", "k", "mteb", "sets"},
    "push": {"repo_id", "private", "revision", "commit_message", "create_repo", "train_dir", "mine_dir", "eval_dir"},
}


def stage_of_keys(keys: set[str], source: str) -> str:
    """The stage a config is for, told by its top-level keys (``run`` for a file with stage sections).

    A stage fits when its schema has every key; among several, the one with a key only it has wins. A file of
    ``filter`` and ``output`` without a teacher is a ``koret filter`` config.
    """
    if keys & {"run", "mine", "train", "eval", "push"}:  # not "filter": a mine config has a filter section
        return "run"
    schemas = {"mine": MineConfig, "train": TrainConfig, "eval": EvalConfig, "push": PushConfig}
    fits = [s for s, schema in schemas.items() if keys <= set(schema.model_fields)]
    marked = [s for s in fits if keys & STAGE_KEYS[s]]
    found = fits if len(fits) == 1 else marked
    if found == ["mine"] and "filter" in keys and "teacher" not in keys:
        return "filter"
    if len(found) == 1:
        return found[0]
    raise KoretError(f"{source}: cannot tell which stage this config is for (top-level keys: "
                     f"{', '.join(sorted(keys)) or 'none'})", "give --stage mine|filter|train|eval|push|run")


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The fully resolved config as plain data (what ``config.yaml`` holds)."""
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: BaseModel | dict[str, Any]) -> str:
    data = config_dict(cfg) if isinstance(cfg, BaseModel) else cfg
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    """Stable hash of a resolved config (used to decide whether a stage's outputs are current)."""
    data = config_dict(cfg) if isinstance(cfg, BaseModel) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
