"""Retrieval sets as the ``mteb`` package lays them out on the Hugging Face Hub, read with ``datasets.load_dataset``.

``data.format: mteb`` with ``path`` (the task's dataset id, or a local folder in the same layout), ``revision``,
``subset`` (the task's subset: ``ko``, ``korean``, ``kor_Hang-kor_Hang``; none or ``default`` for a one-language
task) and ``split``. The layout is told by the dataset's configs and columns, and each is read the way mteb's
loader for it reads it:

- retrieval (most tasks; mteb's ``RetrievalDatasetLoader``): configs ``corpus`` (``_id`` or ``id``, ``title``,
  ``text``), ``queries`` (``_id`` or ``id``, ``text``; a config named ``query`` is taken instead where there is
  one) and ``default`` (else ``qrels``) with ``query-id``, ``corpus-id``, ``score``. A subset prefixes each:
  ``ko-corpus``, ``ko-queries``, ``ko-qrels``. A config without the split asked for that has a single split gives
  that one (corpora are often kept as ``corpus`` or ``train``). A passage is its title and text joined by a space
  and stripped, or its text stripped when it has no title.
- question/answer rows (PublicHealthQA): the subset is a config with ``question`` and ``answer`` columns; equal
  questions are one query (``Q0``, ``Q1``, ... in order of first appearance), equal answers one passage (``D0``,
  ...), each row relates its question to its answer; a row missing either is skipped.
- passages linked by URL (Belebele): a config per language with ``question``, ``link`` and ``flores_passage``;
  subset ``A-B`` takes passages from language ``A`` (one per ``link``: ``C0``, ``C1``, ...) and questions from
  ``B`` (one per text: ``Q0``, ...), each question relevant to its row's passage.

This module only reads; :mod:`koret.data` turns what it returns into a :class:`~koret.data.RetrievalData`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from koret.errors import KoretError


@dataclass
class HubSet:
    """A set as mteb reads it: passages (id, text), query texts by id, judgments (query id, passage id, grade)."""

    corpus: list[tuple[str, str]]
    queries: dict[str, str]
    qrels: list[tuple[str, str, int]]
    layout: str
    configs: list[str] = field(default_factory=list)  # the configs read, for the record


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _named(path: str) -> str:
    """How messages name a set: a local folder, a local file, or a Hub dataset id."""
    kind = "dataset folder" if os.path.isdir(path) else "file" if os.path.exists(path) else "Hub dataset"
    return f"{kind} {path!r}"


def _hub_call(fn: Callable[[], Any], path: str, what: str, key: str) -> Any:
    """Run one ``datasets`` call; anything it raises becomes one line naming the dataset and what was asked."""
    try:
        return fn()
    except KoretError:
        raise
    except Exception as exc:  # datasets / huggingface_hub raise many types (HTTP, offline, missing split)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        local = os.path.exists(path)
        why = ("" if local else "HF_HUB_OFFLINE is set: " if _offline()
               else "the Hub could not be reached or the dataset does not exist: ")
        hint = ("check the folder's configs and splits" if os.path.isdir(path) else
                "a Hub dataset is read by its id or from a folder in its layout, not from one file"
                if local else
                "download it once while online (it is then cached), or point the key at a local file or folder")
        raise KoretError(f"{key}: {_named(path)}: could not load {what} ({why}{text[:300]})", hint) from exc


def load_hub_split(path: str, config: str | None, split: str, revision: str | None, key: str) -> Any:
    """``datasets.load_dataset(path, name=config, split=split, revision=revision)`` with one-line errors."""
    from datasets import load_dataset

    what = f"config {config!r} split {split!r}" if config else f"split {split!r}"
    return _hub_call(lambda: load_dataset(path, name=config, split=split, revision=revision), path, what, key)


def _config_names(path: str, revision: str | None, key: str) -> list[str]:
    from datasets import get_dataset_config_names

    return list(_hub_call(lambda: get_dataset_config_names(path, revision=revision), path, "its configs", key))


def _split_of(path: str, config: str, split: str, revision: str | None, key: str) -> str:
    """``split`` where the config has it, else its only split (mteb's rule), else a one-line error."""
    from datasets import get_dataset_split_names

    splits = list(_hub_call(lambda: get_dataset_split_names(path, config_name=config, revision=revision),
                            path, f"the splits of config {config!r}", key))
    if split in splits:
        return split
    if len(splits) == 1:
        return str(splits[0])
    raise KoretError(f"{key}: {_named(path)}: config {config!r} has no split {split!r} "
                     f"(splits: {', '.join(map(str, splits))})", "set split")


def _columns(ds: Any, needed: tuple[str, ...], path: str, config: str, key: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise KoretError(f"{key}: {_named(path)} config {config!r}: no column {missing[0]!r} "
                         f"(columns: {', '.join(ds.column_names)})")


def _id_column(ds: Any, path: str, config: str, key: str) -> str:
    for name in ("_id", "id"):
        if name in ds.column_names:
            return name
    raise KoretError(f"{key}: {_named(path)} config {config!r}: no id column ('_id' or 'id'; columns: "
                     f"{', '.join(ds.column_names)})")


def passage_text(title: Any, text: Any) -> str:
    """A passage as mteb's retrieval tasks give it to a model: title and text joined by a space and stripped,
    or the text stripped when there is no title."""
    body = "" if text is None else str(text)
    return f"{title} {body}".strip() if title else body.strip()


def read_mteb(path: str, subset: str | None = None, split: str = "test", revision: str | None = None,
              key: str = "data.path") -> HubSet:
    """Read one subset and split of an mteb retrieval set (see the module's docstring for the layouts)."""
    configs = _config_names(path, revision, key)
    prefix = f"{subset}-" if subset not in (None, "", "default") else ""
    if f"{prefix}corpus" in configs:
        return _read_retrieval(path, prefix, split, revision, configs, key)
    parts = (subset or "").split("-")
    if subset and subset in configs:
        probe = load_hub_split(path, subset, split, revision, key)
        if {"question", "answer"} <= set(probe.column_names):
            return _read_question_answer(probe, path, subset)
        if {"question", "link", "flores_passage"} <= set(probe.column_names):
            return _read_linked_passages(probe, probe, path, [subset], key)
        raise KoretError(f"{key}: {_named(path)} config {subset!r}: not an mteb retrieval layout (columns: "
                         f"{', '.join(probe.column_names)})", "expected corpus/queries/qrels configs, question + "
                         "answer, or question + link + flores_passage columns")
    if len(parts) == 2 and all(p in configs for p in parts):
        passages = load_hub_split(path, parts[0], split, revision, key)
        questions = passages if parts[1] == parts[0] else load_hub_split(path, parts[1], split, revision, key)
        for ds, config in ((passages, parts[0]), (questions, parts[1])):
            _columns(ds, ("question", "link", "flores_passage"), path, config, key)
        return _read_linked_passages(passages, questions, path, [parts[0], parts[1]], key)
    shown = ", ".join(configs[:12]) + (", ..." if len(configs) > 12 else "")
    raise KoretError(f"{key}: {_named(path)} has no mteb layout for subset {subset or 'default'!r} "
                     f"(no config {prefix}corpus; configs: {shown})", "set subset to one of the task's subsets")


def _read_retrieval(path: str, prefix: str, split: str, revision: str | None, configs: list[str],
                    key: str) -> HubSet:
    """mteb's ``RetrievalDatasetLoader``: corpus, queries and qrels configs."""
    names = {"corpus": f"{prefix}corpus",
             "queries": "query" if "query" in configs else f"{prefix}queries",
             "qrels": f"{prefix}qrels" if prefix else "default" if "default" in configs else "qrels"}
    for what, config in names.items():
        if config not in configs:
            raise KoretError(f"{key}: {_named(path)}: no {what} config {config!r} (configs: {', '.join(configs)})")
    loaded = {what: load_hub_split(path, config, _split_of(path, config, split, revision, key), revision, key)
              for what, config in names.items()}
    corpus_ds, queries_ds, qrels_ds = loaded["corpus"], loaded["queries"], loaded["qrels"]
    cid = _id_column(corpus_ds, path, names["corpus"], key)
    _columns(corpus_ds, ("text",), path, names["corpus"], key)
    titles = corpus_ds["title"] if "title" in corpus_ds.column_names else [None] * len(corpus_ds)
    corpus = [(str(i), passage_text(t, x)) for i, t, x in zip(corpus_ds[cid], titles, corpus_ds["text"], strict=True)]
    qid = _id_column(queries_ds, path, names["queries"], key)
    _columns(queries_ds, ("text",), path, names["queries"], key)
    queries = {str(i): t for i, t in zip(queries_ds[qid], queries_ds["text"], strict=True)}
    _columns(qrels_ds, ("query-id", "corpus-id", "score"), path, names["qrels"], key)
    qrels = [(str(q), str(d), int(s)) for q, d, s in
             zip(qrels_ds["query-id"], qrels_ds["corpus-id"], qrels_ds["score"], strict=True)]
    return HubSet(corpus, queries, qrels, "retrieval", list(names.values()))


def _read_question_answer(ds: Any, path: str, config: str) -> HubSet:
    """PublicHealthQA's rows of (question, answer): equal texts are one query / one passage; ids number every
    text present, also on a row then skipped for missing its question or answer (as mteb numbers them)."""
    rows = list(zip(ds["question"], ds["answer"], strict=True))
    question_ids: dict[str, str] = {}
    answer_ids: dict[str, str] = {}
    for question, answer in rows:
        if question is not None:
            question_ids.setdefault(question, f"Q{len(question_ids)}")
        if answer is not None:
            answer_ids.setdefault(answer, f"D{len(answer_ids)}")
    pairs = [(question_ids[q], answer_ids[a]) for q, a in rows if q is not None and a is not None]
    judged_q, judged_d = {q for q, _ in pairs}, {d for _, d in pairs}
    return HubSet([(d, passage_text(None, a)) for a, d in answer_ids.items() if d in judged_d],
                  {q: t for t, q in question_ids.items() if q in judged_q}, [(q, d, 1) for q, d in pairs],
                  "question-answer", [config])


def _read_linked_passages(passages: Any, questions: Any, path: str, configs: list[str], key: str) -> HubSet:
    """Belebele: one passage per link (from ``passages``), one query per question text (from ``questions``)."""
    by_link: dict[str, str] = {}
    corpus: list[tuple[str, str]] = []
    for link, text in zip(passages["link"], passages["flores_passage"], strict=True):
        if link not in by_link:
            by_link[link] = f"C{len(by_link)}"
            corpus.append((by_link[link], passage_text(None, text)))
    question_ids: dict[str, str] = {}
    qrels: list[tuple[str, str, int]] = []
    for question, link in zip(questions["question"], questions["link"], strict=True):
        if link not in by_link:
            raise KoretError(f"{key}: {_named(path)}: a question of config {configs[-1]!r} links to "
                             f"{link!r}, which no passage of config {configs[0]!r} has")
        q = question_ids.setdefault(question, f"Q{len(question_ids)}")
        qrels.append((q, by_link[link], 1))
    return HubSet(corpus, {q: t for t, q in question_ids.items()}, qrels, "linked-passages",
                  list(dict.fromkeys(configs)))
