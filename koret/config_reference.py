"""The configuration reference (``docs/configuration.md``), generated from the config models of :mod:`koret.config`.

``koret config reference`` prints it; ``tests/test_docs.py`` holds the page to it, so a key renamed, added or
given another default in ``koret/config.py`` fails the tests until the page is regenerated::

    koret config reference > docs/configuration.md

Each key's description is its pydantic ``Field(description=...)``; :data:`NOTES` describes the fields that have
none (an entry for a field that does not exist, or that has its own description now, is an error, so the notes
cannot outlive their fields). :func:`key_exists` answers whether a dotted key is part of a schema, and
:func:`key_annotation` gives its type (the docs tests check every ``--set`` and every key named in the docs
with them).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from koret import config as c

NOTES: dict[str, str] = {  # "Model.field": description, for fields without Field(description=...)
    "DataConfig.format": "Layout of `data.train` (auto: told by the path).",
    "DataConfig.query_column": "Column holding the query (default: the first column).",
    "DataConfig.positive_column": "Column holding the positive passage (default: the second column).",
    "DataConfig.normalize": "nfc: NFC-normalize every text, fold and strip whitespace; none: texts as they are.",
    "DataConfig.corpus_format": "Layout of `data.corpus`.",
    "DataConfig.corpus_column": "Column of `data.corpus` holding the passage text.",
    **{f"{source}Config.{key}": text for source in ("MineSource", "TrainSource", "RerankerSource") for key, text in (
        ("format", "Layout of this source's train (auto: told by the path)."),
        ("query_column", "Column holding the query (default: the first)."),
        ("positive_column", "Column holding the positive (default: the second)."),
        ("normalize", "nfc: NFC-normalize every text, fold and strip whitespace; none: as they are."))},
    "TeacherConfig.batch_size": "Texts per encoding batch.",
    "TeacherConfig.max_seq_length": "Max tokens per text (default: the model's).",
    "SearchConfig.backend": "auto: FAISS on GPU, else torch on CUDA, else FAISS on CPU, else torch on CPU.",
    "SearchConfig.top_k": "Dense candidates per query.",
    "SearchConfig.query_chunk_size": "Queries searched at a time (bounds the query x shard block of scores).",
    "LexicalConfig.method": "BM25 as bm25s computes it (Lucene's variant).",
    "LexicalConfig.k1": "BM25 term-frequency saturation.",
    "LexicalConfig.b": "BM25 document-length normalization.",
    "RescoreConfig.batch_size": "(query, passage) pairs per CrossEncoder batch.",
    "RescoreConfig.max_length": "Max tokens per pair (default: the model's).",
    "FilterConfig.num_negatives": "Hard negatives per (query, positive) row of train.parquet.",
    "FilterConfig.sampling": "top: the best-scoring survivors; random: a seeded draw among them.",
    "FilterConfig.seed": "Seed of random sampling and pad_random, drawn per row (the same on any process count).",
    "FilterConfig.on_shortage": "A row with fewer survivors than num_negatives: drop it, or pad_random with random "
                                "corpus passages that pass the same rules.",
    "OutputConfig.dir": "Output folder (koret run: <run.dir>/mine, <run.dir>/filter).",
    "ModelConfig.max_seq_length": "Max tokens per text in training (default: the model's).",
    "TrainDataConfig.format": "Layout of `data.train` (auto: told by the path).",
    "TrainDataConfig.query_column": "Column holding the query (default: the first; a mined file: anchor).",
    "TrainDataConfig.positive_column": "Column holding the positive (default: the second).",
    "TrainDataConfig.normalize": "nfc: NFC-normalize every text, fold and strip whitespace; none: as they are.",
    "TrainDataConfig.eval_format": "Layout of `data.eval`.",
    "TrainDataConfig.eval_split": "qrels/<split>.tsv of a BEIR eval set, or a Hub split.",
    "TrainDataConfig.eval_max_queries": "Evaluate on the first N queries only.",
    "LossConfig.margin_strategy": "GIST: absolute (mask above positive - margin) or relative (above positive x "
                                  "(1 - margin)).",
    "LossConfig.margin": "GIST: margin of the guide's masking (0: mask what the guide scores above the positive).",
    "LossConfig.contrast_anchors": "GIST: also contrast anchor-anchor pairs.",
    "LossConfig.contrast_positives": "GIST: also contrast positive-positive pairs.",
    "LossConfig.gather_across_devices": "In-batch negatives span every process (all-gather).",
    "TrainConfig.cache_dir": "Not read by koret train (accepted so the key is the same in every stage).",
    "RerankerDataConfig.format": "Layout of `data.train` (auto: told by the path).",
    "RerankerDataConfig.query_column": "Column holding the query (default: the first; a mined file: anchor).",
    "RerankerDataConfig.positive_column": "Column holding the positive (default: the second).",
    "RerankerDataConfig.normalize": "nfc: NFC-normalize every text, fold and strip whitespace; none: as they are.",
    "RerankerDataConfig.eval_max_queries": "Evaluate on the first N held-out queries only.",
    "RerankerLossConfig.name": "The cross-encoder loss; what rows each one trains on: docs/reranker.md.",
    "EvalDataConfig.format": "Layout of `data.path` (auto: told by the path).",
    "EvalDataConfig.query_column": "Column holding the query (pairs layouts; default: the first).",
    "EvalDataConfig.positive_column": "Column holding the relevant passage (pairs layouts; default: the second).",
    "EvalDataConfig.corpus_format": "Layout of `data.corpus`.",
    "EvalDataConfig.corpus_column": "Column of `data.corpus` holding the passage text.",
    "EvalDataConfig.normalize": "nfc: NFC-normalize texts (never ids); none: as they are.",
    "EvalDataConfig.max_queries": "Evaluate the first N judged queries only.",
    "EvalModelConfig.max_seq_length": "Max tokens per text (default: the model's).",
    "EvalModelConfig.batch_size": "Texts per encoding batch.",
    "EvalRerankerConfig.max_length": "Max tokens per (query, passage) pair (default: the model's).",
    "EvalRerankerConfig.batch_size": "Pairs per batch.",
    "EvalConfig.models": "The models to compare, each with its own prompts; the first is the baseline.",
    "EvalConfig.rerankers": "CrossEncoders; each reorders the top rerank_top_k of rerank_model's ranking.",
    "EvalConfig.k": "Cut-offs of every metric (sorted and deduplicated; clamped to the corpus size).",
    "EvalSearchConfig.backend": "auto: FAISS on GPU, else torch on CUDA, else FAISS on CPU, else torch on CPU.",
    "EvalSearchConfig.query_chunk_size": "Queries searched at a time.",
    "EvalOutputConfig.dir": "Output folder: metrics.json, metrics.csv, per_query.jsonl.",
    "SignificanceConfig.seed": "Seed of the bootstrap and the randomization test.",
    "EvalConfig.cache_dir": "Embedding shard cache (the same cache as koret mine's).",
    "PushConfig.private": "Create the repository as private.",
    "PushConfig.commit_message": "Commit message of the upload.",
    "PushConfig.create_repo": "Create the repository if it is missing (exist_ok).",
    "PushConfig.retries": "Retries of transient failures (429, 5xx, connection resets, timeouts), with backoff.",
}

TRAINING_ARGS = {  # the schema fields that pass through to sentence-transformers' training arguments
    ("TrainConfig", "args"): "SentenceTransformerTrainingArguments",
    ("RerankerConfig", "args"): "CrossEncoderTrainingArguments",
}

_VALIDATORS = {c._non_negative: ">= 0"}  # AfterValidator functions whose rule the type column states


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(annotation without ``| None``, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
        func = getattr(meta, "func", None)
        if func in _VALIDATORS:
            parts.append(_VALIDATORS[func])
    return ", ".join(parts)


def _type_name(annotation: Any) -> str:
    """What the type column says: ``int``, ``str or null``, ``one of `a`, `b```, ``float, `auto` or null``."""
    inner, optional = _unwrap(annotation)
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):  # several types (one optional type is unwrapped above)
        args = typing.get_args(inner)
        parts = [", ".join(f"`{v}`" for v in typing.get_args(a)) if typing.get_origin(a) is Literal
                 else _type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        name = "one of " + ", ".join(f"`{v}`" for v in typing.get_args(inner))
    elif origin is list:
        (item,) = typing.get_args(inner)
        name = "list of mappings" if _is_section(item) else f"list of {_type_name(item)}"
    elif origin is dict:
        name = "mapping"
    elif _is_section(inner):
        name = "section"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner).replace("typing.", "")
    return f"{name} or null" if optional else name


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}" if 0 < abs(value) < 1e-3 else repr(value)
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    return f"`{_yaml_value(value)}`"


def _description(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if field.description:
        return field.description
    return NOTES.get(f"{model.__name__}.{name}", "")


def _training_args_note(class_name: str) -> str:
    if class_name == "SentenceTransformerTrainingArguments":
        from koret.training.common import DEFAULT_ARGS as defaults
    else:
        from koret.train_reranker import RERANKER_DEFAULTS as defaults  # noqa: N811
    shown = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in defaults.items())
    return (f"Any field of sentence-transformers' {class_name} (an unknown key is an error with a suggestion). "
            f"koret's defaults: {shown}; 10% warmup unless warmup_steps / warmup_ratio is set.")


def rows(model: type[BaseModel], prefix: str = "") -> list[Row]:
    """Every key of ``model`` as a :class:`Row`, nested sections flattened into dotted keys, in schema order.
    A required section is only its keys; an optional section (``search.lexical``) or a list of mappings
    (``models``) is also a row of its own."""
    out: list[Row] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        inner, optional = _unwrap(field.annotation)
        if typing.get_origin(inner) is list and _is_section(typing.get_args(inner)[0]):
            item = typing.get_args(inner)[0]
            out.append(Row(key, _type_name(field.annotation), _default(field),
                           _description(model, name, field) or _first_line(item.__doc__)))
            out += rows(item, key + "[].")
        elif _is_section(inner) and optional:
            out.append(Row(key, "section or null", _default(field), _description(model, name, field)))
            out += rows(inner, key + ".")
        elif _is_section(inner):
            out += rows(inner, key + ".")
        else:
            description = _description(model, name, field)
            if (model.__name__, name) in TRAINING_ARGS:
                description = _training_args_note(TRAINING_ARGS[(model.__name__, name)])
            type_name = _type_name(field.annotation)
            limits = _constraints(field)
            out.append(Row(key, f"{type_name} ({limits})" if limits else type_name, _default(field), description))
    return out


def _html(text: str) -> str:
    """Markdown table text: ``<run.dir>`` would be read as an HTML tag."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def check_notes() -> None:
    """Every :data:`NOTES` entry names a field of a config model that has no description of its own."""
    for entry in NOTES:
        cls_name, _, field_name = entry.partition(".")
        cls = getattr(c, cls_name, None)
        fields = getattr(cls, "model_fields", {})
        if field_name not in fields:
            raise ValueError(f"koret.config_reference.NOTES[{entry!r}]: no such config field (renamed?)")
        if fields[field_name].description:
            raise ValueError(f"koret.config_reference.NOTES[{entry!r}]: the field has its own description now; "
                             "remove the note")


def schemas() -> dict[str, type[BaseModel]]:
    """Each command's config schema, in chain order (``koret filter`` reads a mine config)."""
    from koret.pipeline import PipelineConfig
    from koret.stages import REGISTRY

    out: dict[str, type[BaseModel]] = {stage.command: stage.schema for stage in REGISTRY.values()}
    out["run"] = PipelineConfig
    return out


def _split_key(key: str) -> list[str]:
    return [p for p in key.replace("[]", "").split(".") if p]


def key_exists(model: type[BaseModel], key: str) -> bool:
    """Whether the dotted ``key`` (``search.lexical.top_k``, ``args.learning_rate``, ``models.0.name``) is a key
    of ``model``; ``args.*`` must be a field of the trainer's arguments class."""
    current: Any = model
    parts = _split_key(key)
    for i, part in enumerate(parts):
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return False
        field = fields[part]
        inner, _ = _unwrap(field.annotation)
        rest = parts[i + 1:]
        if (current.__name__, part) in TRAINING_ARGS:
            return len(rest) <= 1 and (not rest or rest[0] in c.training_argument_names(
                TRAINING_ARGS[(current.__name__, part)]))
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            if rest and rest[0].isdigit():
                rest = rest[1:]
            return not rest or (_is_section(item) and key_exists(item, ".".join(rest)))
        if typing.get_origin(inner) is dict:
            return True
        if not _is_section(inner):
            return not rest
        current = inner
    return True


def key_annotation(model: type[BaseModel], key: str) -> Any:
    """The type annotation of the dotted ``key`` of ``model`` (``filter.strategy``, ``models.0.dtype``), or None
    when the key is not a field of a config model (``args.*`` and mapping keys, unknown keys)."""
    current: Any = model
    parts = _split_key(key)
    for i, part in enumerate(parts):
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields or (current.__name__, part) in TRAINING_ARGS:
            return None
        field = fields[part]
        rest = parts[i + 1:]
        if not rest:
            return field.annotation
        inner, _ = _unwrap(field.annotation)
        if typing.get_origin(inner) is list:
            (inner,) = typing.get_args(inner)
            if rest[0].isdigit():
                rest = rest[1:]
            if not rest:
                return inner
            return key_annotation(inner, ".".join(rest)) if _is_section(inner) else None
        if not _is_section(inner):
            return None
        current = inner
    return None


def _table(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for r in rows(model, prefix):
        cells = [f"`{r.key}`", r.type, r.default, _html(r.description)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


INTRO = """\
<!-- Generated by `koret config reference` from the config models in koret/config.py: do not edit by hand.
     Regenerate with: koret config reference > docs/configuration.md (tests/test_docs.py checks it is current) -->

# Configuration reference

Every key of every command's config file, with its type, default and description. Each command reads one YAML
file (`-c FILE`); `--set dotted.key=value` overrides any key (the value is read as YAML), and
`koret config show -c FILE` prints a file with every default filled in. An unknown key is an error with a
suggestion; `koret config validate -c FILE` checks a file without running anything (see
[troubleshooting](troubleshooting.md)). The commented example files in `configs/` hold the same keys.

Types: `int (>= 1)` is a constraint checked on load; `X or null` may be `null` (YAML's `~` or `null`); a
`section or null` is off when null; float, `auto` or null takes a number, the word `auto` or `null`;
`models[].name` is the key `name` of each entry of the list `models`.
"""

SECTIONS = {  # command: (heading text, what the file is)
    "mine": "`koret mine` reads this file (example: `configs/mine.yaml`).",
    "filter": "`koret filter` reads a mine config (usually the `config.yaml` a mine run wrote) and uses its "
              "`filter` and `output` sections, and `filter.candidates`; see [koret mine](#koret-mine) for the keys.",
    "train": "`koret train` (example: `configs/train.yaml`).",
    "train-reranker": "`koret train-reranker` (example: `configs/reranker.yaml`).",
    "eval": "`koret eval -c FILE` (example: `configs/eval.yaml`); `--model`, `--data` and the other flags set "
            "the same keys.",
    "push": "`koret push` (example: `configs/push.yaml`). The token is never part of it: `HF_TOKEN`, or "
            "`huggingface-cli login`.",
    "run": "`koret run` (example: `configs/quickstart.yaml`): `run.dir` and one optional section per stage, "
           "each with the keys of that stage's own file, except `filter`, which holds only the keys of mine's "
           "`filter` section.",
}


def reference() -> str:
    """The Markdown of ``docs/configuration.md``."""
    from koret.pipeline import CHAIN
    from koret.stages import REGISTRY

    check_notes()
    lines = [INTRO]
    for command, schema in schemas().items():
        lines += [f"## koret {command}", "", SECTIONS[command], ""]
        if command == "filter":
            continue
        if command == "run":
            lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
            for r in rows(schema.model_fields["run"].annotation, "run."):
                lines.append(f"| `{r.key}` | {r.type} | {r.default} | {_html(r.description)} |")
            for name in CHAIN:
                stage = REGISTRY[name]
                what = ("the keys of mine's `filter` section" if name == "filter"
                        else f"the keys of [koret {stage.command}](#koret-{stage.command})")
                lines.append(f"| `{name}` | section or null | `null` | The {name} stage: {what}. |")
            lines.append("")
            continue
        lines += _table(schema) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"
