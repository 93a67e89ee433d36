"""Reading retrieval data in every layout koret accepts, normalized for Korean, into one shape.

Layouts (``data.format``, auto-detected from the path when unambiguous):

- pairs of (query, positive) in ``jsonl``/``json``/``csv``/``tsv``/``parquet``, a ``datasets.save_to_disk``
  folder (``hf_disk``) or a Hub dataset id (``hub``). Columns are configurable, the first two by default (never
  a column of ids: that is refused, as is koret mine's ``candidates.parquet``, which holds passage ids).
  Several positives for one query are repeated query rows.
- ``squad``: SQuAD-style JSON (KorQuAD, KLUE-MRC); each question's paragraph is its positive.
- ``beir``: a folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (graded relevance kept).
- ``mteb``: a retrieval set as the ``mteb`` package keeps it on the Hub (``data.subset``, ``data.revision``;
  never auto-detected), read by :mod:`koret.hub_layouts`.
- ``autorag``: a QA parquet (``query``, nested ``retrieval_gt`` doc ids) and a corpus parquet (``doc_id``,
  ``contents``), either as one folder holding ``qa.parquet`` + ``corpus.parquet`` or as the QA file with
  ``data.corpus`` (or a ``corpus.parquet`` beside it).
- ``text``: one passage per line (extra corpus only).

Korean text copied from PDFs or macOS often arrives decomposed (NFD jamo), which breaks tokenization and
deduplication. With ``data.normalize: nfc`` (the default) every text is NFC-normalized, whitespace is folded
and stripped before anything else, and passages (and queries) identical after that are one.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from koret.errors import KoretError

_WS = re.compile(r"\s+")
_TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                   ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
_TEXT_COLUMNS = ("text", "contents", "passage", "document", "context", "content", "positive")


def normalize_text(text: str, mode: str = "nfc") -> str:
    """NFC-normalize, fold runs of whitespace into one space and strip (``mode='none'`` returns text as is)."""
    if mode == "none":
        return text
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


@dataclass
class RetrievalData:
    """Queries, a deduplicated corpus and graded relevance, all by integer index.

    ``pairs`` lists the (query index, passage index) rows with positive relevance in input order: these are
    the rows a mined training set has. ``groups[i]`` identifies passages whose NFC-normalized text is equal
    (equal to ``i`` when the corpus was normalized), so a candidate equal to a positive is recognised even when
    ``normalize: none`` kept both spellings.
    """

    queries: list[str]
    corpus: list[str]
    qrels: list[dict[int, int]]
    pairs: list[tuple[int, int]]
    query_ids: list[str]
    doc_ids: list[str]
    groups: list[int]
    source: str
    format: str
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # rows set aside while reading, by reason

    def with_positives_only(self) -> RetrievalData:
        """The same data without queries that have no positive (e.g. BEIR queries judged only 0), counted in
        ``counts``; mining needs a positive per query. Raises a one-line error when no query is left."""
        keep = [q for q, rel in enumerate(self.qrels) if any(g > 0 for g in rel.values())]
        if len(keep) == len(self.queries):
            return self
        if not keep:
            raise KoretError(f"data.train: {self.source}: no query has a positive (relevance > 0)",
                             "check the qrels / positive column")
        new_index = {q: i for i, q in enumerate(keep)}
        counts = {**self.counts, "queries without a positive skipped": len(self.queries) - len(keep)}
        return RetrievalData(
            [self.queries[q] for q in keep], self.corpus, [self.qrels[q] for q in keep],
            [(new_index[q], d) for q, d in self.pairs if q in new_index], [self.query_ids[q] for q in keep],
            self.doc_ids, self.groups, self.source, self.format,
            notes=[*self.notes, f"{len(self.queries) - len(keep):,} queries without a positive skipped"],
            counts=counts)

    def with_rows(self, rows: Any) -> RetrievalData:
        """The same data with only the queries that the (query, positive) rows ``rows`` (indices into ``pairs``)
        ask, each with all its judgments and all its rows: a query's positives are never split (an undrawn one
        would otherwise be a negative candidate, and mining makes a row of every positive), so a query with
        several positives brings them all; the corpus unchanged."""
        drawn = {self.pairs[i][0] for i in rows}
        picked = [(q, d) for q, d in self.pairs if q in drawn]
        keep = sorted(drawn)
        new_index = {q: i for i, q in enumerate(keep)}
        return RetrievalData(
            [self.queries[q] for q in keep], self.corpus, [self.qrels[q] for q in keep],
            [(new_index[q], d) for q, d in picked], [self.query_ids[q] for q in keep], self.doc_ids, self.groups,
            self.source, self.format,
            notes=[*self.notes, f"{len(rows):,} of {len(self.pairs):,} rows drawn (data.sample): {len(picked):,} rows "
                                f"of {len(keep):,} queries with all their positives"],
            counts=self.counts)

    @property
    def num_positive_passages(self) -> int:
        return len({d for _, d in self.pairs})

    def fingerprint(self) -> str:
        """Hash of the exact texts and judgments, to tell whether two runs saw the same data."""
        h = hashlib.sha256()
        for text in self.queries:
            h.update(text.encode())
            h.update(b"\x00")
        h.update(b"\x01")
        for text in self.corpus:
            h.update(text.encode())
            h.update(b"\x00")
        h.update(json.dumps([sorted(r.items()) for r in self.qrels]).encode())
        return h.hexdigest()[:16]


class _Builder:
    """Accumulates queries, passages and judgments with normalization and deduplication."""

    def __init__(self, normalize: str, source: str, dedupe: bool = True) -> None:
        self.normalize = normalize
        self.source = source
        self.dedupe = dedupe
        self.counts: dict[str, int] = {}
        self.queries: list[str] = []
        self.query_ids: list[str] = []
        self._query_index: dict[str, int] = {}
        self.corpus: list[str] = []
        self.doc_ids: list[str] = []
        self._doc_index: dict[str, int] = {}
        self._doc_ext: dict[str, int] = {}
        self._query_ext: dict[str, int] = {}
        self.qrels: list[dict[int, int]] = []
        self.pairs: list[tuple[int, int]] = []
        self._pair_set: set[tuple[int, int]] = set()

    def add_doc(self, text: Any, ext_id: str | None = None, where: str = "") -> int:
        return self._intern(self._clean(text, "passage", where), self.corpus, self._doc_index, self.doc_ids,
                            self._doc_ext, ext_id, "d")[0]

    def add_query(self, text: Any, ext_id: str | None = None, where: str = "") -> int:
        idx, new = self._intern(self._clean(text, "query", where), self.queries, self._query_index, self.query_ids,
                                self._query_ext, ext_id, "q")
        if new:
            self.qrels.append({})
        return idx

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def _intern(self, norm: str, texts: list[str], index: dict[str, int], ids: list[str], ext: dict[str, int],
                ext_id: str | None, prefix: str) -> tuple[int, bool]:
        """Index of ``norm`` among ``texts`` (added if new); external ids map to the first text they name.

        Without deduplication (evaluation sets) an external id is its own entry even when its text equals
        another's: the set's structure is kept as published. Texts without an id are still one entry per text.
        """
        if not self.dedupe and ext_id is not None:
            idx = ext.get(str(ext_id))
            if idx is None:
                idx = len(texts)
                ext[str(ext_id)] = idx
                texts.append(norm)
                ids.append(str(ext_id))
                index.setdefault(norm, idx)
                return idx, True
            return idx, False
        idx = index.get(norm)
        new = idx is None
        if idx is None:
            idx = len(texts)
            index[norm] = idx
            texts.append(norm)
            ids.append(str(ext_id) if ext_id is not None else f"{prefix}{idx}")
        if ext_id is not None:
            ext.setdefault(str(ext_id), idx)
        return idx, new

    def doc_by_id(self, ext_id: str) -> int | None:
        return self._doc_ext.get(str(ext_id))

    def query_by_id(self, ext_id: str) -> int | None:
        return self._query_ext.get(str(ext_id))

    def relate(self, q: int, d: int, grade: int = 1) -> None:
        self.qrels[q][d] = max(grade, self.qrels[q].get(d, grade))
        if grade > 0 and (q, d) not in self._pair_set:
            self._pair_set.add((q, d))
            self.pairs.append((q, d))

    def _clean(self, text: Any, what: str, where: str) -> str:
        if text is None or (isinstance(text, float) and text != text):
            raise KoretError(f"{self.source}: {where}: empty {what} (missing value)", "remove the row or fill it in")
        if not isinstance(text, str):
            text = str(text)
        norm = normalize_text(text, self.normalize)
        if not norm.strip():
            raise KoretError(f"{self.source}: {where}: empty {what}", "remove the row or fill it in")
        return norm

    def build(self, fmt: str) -> RetrievalData:
        if not self.queries:
            raise KoretError(f"{self.source}: no queries found (empty dataset)")
        groups = _groups(self.corpus, self.normalize, self.dedupe)
        data = RetrievalData(self.queries, self.corpus, self.qrels, self.pairs, self.query_ids, self.doc_ids,
                             groups, self.source, fmt, counts=dict(self.counts))
        return data


def _groups(corpus: Sequence[str], normalize: str, deduped: bool = True) -> list[int]:
    if normalize != "none" and deduped:
        return list(range(len(corpus)))
    first: dict[str, int] = {}
    return [first.setdefault(normalize_text(text, "nfc"), i) for i, text in enumerate(corpus)]


# --------------------------------------------------------------------------------------------- detection


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not path.startswith((".", "/"))


def detect_format(path: str, key: str = "data.train") -> str:
    """Guess the layout of ``path``; raise a one-line error when it does not exist or is ambiguous."""
    p = Path(path)
    if not p.exists():
        if _looks_like_hub_id(path) and not p.parent.exists():
            return "hub"
        raise KoretError(f"{key}: file not found: {path}", "check the path (relative paths start at the current folder)")
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if "corpus.jsonl" in names and "queries.jsonl" in names:
            return "beir"
        if "qa.parquet" in names and "corpus.parquet" in names:
            return "autorag"
        if "dataset_info.json" in names or "state.json" in names or "dataset_dict.json" in names:
            return "hf_disk"
        raise KoretError(f"{key}: cannot tell the layout of folder {path}",
                         "expected BEIR (corpus.jsonl, queries.jsonl, qrels/), AutoRAG (qa.parquet, corpus.parquet) "
                         "or a datasets.save_to_disk folder; set data.format")
    fmt = _TABLE_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise KoretError(f"{key}: cannot tell the format of {path} from its suffix",
                         "set data.format to one of jsonl, json, csv, tsv, parquet, squad, text")
    if fmt == "json" and _is_squad(p):
        return "squad"
    if fmt == "parquet" and {"query", "retrieval_gt"} <= set(_parquet_columns(p, key)):
        return "autorag"
    return fmt


def _is_squad(p: Path) -> bool:
    with open(p, "rb") as fh:
        head = fh.read(4096).decode("utf-8", errors="ignore").lstrip()
    if not head.startswith("{"):
        return False
    return '"data"' in head and ('"paragraphs"' in head or '"version"' in head or '"title"' in head)


def _parquet_columns(p: Path, key: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(p).names)
    except Exception as exc:
        raise KoretError(f"{key}: {p}: unreadable or corrupt parquet ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------- tables


def read_table(path: str, fmt: str, key: str = "data.train", split: str = "train", *, subset: str | None = None,
               revision: str | None = None) -> Any:
    """Read a tabular source into a pandas DataFrame with one-line errors (``subset``, ``revision``: a Hub
    dataset's config and revision)."""
    import pandas as pd

    p = Path(path)
    try:
        if fmt == "jsonl":
            df = pd.read_json(p, lines=True, dtype=False)
        elif fmt == "json":
            with open(p, encoding="utf-8") as fh:
                loaded = json.load(fh)
            if isinstance(loaded, dict):
                lists = [v for v in loaded.values() if isinstance(v, list)]
                if len(loaded) == 1 and lists:
                    loaded = lists[0]
                elif all(isinstance(v, list) for v in loaded.values()):
                    loaded = pd.DataFrame(loaded).to_dict("records")
            if not isinstance(loaded, list):
                raise KoretError(f"{key}: {path}: expected a JSON list of records (or use data.format: squad)")
            df = pd.DataFrame.from_records(loaded)
        elif fmt in ("csv", "tsv"):
            df = pd.read_csv(p, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                             quoting=3 if fmt == "tsv" else 0)
        elif fmt == "parquet":
            df = pd.read_parquet(p)
        elif fmt == "hf_disk":
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(p))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise KoretError(f"{key}: {path}: no split {split!r} (available: {', '.join(ds)})",
                                     "set data.split")
                ds = ds[split]
            df = ds.to_pandas()
        elif fmt == "hub":
            from koret.hub_layouts import load_hub_split

            df = load_hub_split(path, subset, split, revision, key).to_pandas()
        else:  # pragma: no cover - guarded by the callers
            raise KoretError(f"{key}: format {fmt!r} is not a table")
    except KoretError:
        raise
    except FileNotFoundError as exc:
        raise KoretError(f"{key}: file not found: {path}") from exc
    except (ValueError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KoretError(f"{key}: {path}: unreadable or corrupt {fmt} ({first})") from exc
    except Exception as exc:  # pyarrow raises its own types for corrupt parquet
        if type(exc).__module__.startswith(("pyarrow", "datasets")):
            raise KoretError(f"{key}: {path}: unreadable or corrupt {fmt} ({str(exc).splitlines()[0]})") from exc
        raise
    if len(df) == 0:
        raise KoretError(f"{key}: {path}: no rows (empty dataset)")
    return df


def _pick_column(df: Any, wanted: str | None, position: int, key: str, option: str) -> str:
    """The column ``option`` names, else the one at ``position``; a guessed column that holds ids is refused (a
    pairs file that starts with an id column would otherwise train on (id, text) pairs without a word)."""
    cols = [str(c) for c in df.columns]
    if wanted is not None:
        if wanted not in cols:
            raise KoretError(f"{key}: column {wanted!r} ({option}) not found; available columns: {', '.join(cols)}",
                             f"set {option}")
        return wanted
    if len(cols) <= position:
        raise KoretError(f"{key}: needs at least {position + 1} columns, found {len(cols)} ({', '.join(cols)})",
                         f"set {option}")
    guess = cols[position]
    why = _id_column(guess, df[df.columns[position]].tolist())
    if why:
        role = "query" if position == 0 else "positive passage"
        raise KoretError(f"{key}: column {guess!r} (column {position + 1}, the default {role} column) {why}, not "
                         f"{role} text; columns found: {', '.join(cols)}",
                         f"set {option} to the column that holds the {role} text")
    return guess


# column names that say "identifier": id, _id, qid, doc_id, query-ids, passage.id, queryId (camelCase)
_ID_NAMES = {"id", "ids", "_id", "qid", "pid", "did", "docid", "idx", "uuid", "guid"}
_ID_SUFFIX = re.compile(r"[_\-. ](?:id|ids|idx)$", re.IGNORECASE)
_CAMEL_ID = re.compile(r"[a-z]Ids?$")
# an id-like value: a short token without spaces that holds a digit (1, q1, doc-0003, 2f9c1e)
_ID_VALUE = re.compile(r"[A-Za-z0-9_.:#/-]{0,63}")


def _id_column(name: str, values: list[Any]) -> str | None:
    """Why a column holds identifiers rather than text, or None: named like an id, or every value (ignoring
    missing ones) is an integer or an id-like token (no spaces, at least one digit); lists count by their items."""
    if name.lower() in _ID_NAMES or _ID_SUFFIX.search(name) or _CAMEL_ID.search(name):
        return "is named like an id"
    present = [v for v in values if v is not None and not (isinstance(v, float) and v != v)]
    if present and all(_is_id_value(v) for v in present):
        shown = ", ".join(repr(_plain(v)) for v in present[:3])
        return f"holds ids (every value is an integer or an id-like token: {shown}, ...)"
    return None


def _is_id_value(value: Any) -> bool:
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, (float, np.floating)):
        return float(value).is_integer()
    if isinstance(value, str):
        return bool(_ID_VALUE.fullmatch(value)) and any(ch.isdigit() for ch in value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) > 0 and all(_is_id_value(v) for v in value)
    return False


def _plain(value: Any) -> Any:
    """A value as plain Python for a message (numpy scalars and arrays print as their numbers)."""
    return value.tolist() if hasattr(value, "tolist") else value


# the columns of ``candidates.parquet`` (koret mine's per-query candidates, see :mod:`koret.candidates`)
CANDIDATE_COLUMNS = ("query_id", "query", "positive_ids", "candidate_ids", "teacher_positive_scores",
                     "teacher_candidate_scores")


def is_candidates_table(columns: Iterable[Any]) -> bool:
    """Whether a table's columns are those of ``candidates.parquet``: passage ids per query, not texts."""
    return {"positive_ids", "candidate_ids"} <= {str(c) for c in columns}


# --------------------------------------------------------------------------------------------- readers


def load_retrieval_data(
    path: str,
    fmt: str = "auto",
    *,
    query_column: str | None = None,
    positive_column: str | None = None,
    corpus: str | None = None,
    corpus_format: str = "auto",
    corpus_column: str | None = None,
    split: str = "train",
    normalize: str = "nfc",
    limit: int | None = None,
    key: str = "data.train",
    dedupe: bool = True,
    subset: str | None = None,
    revision: str | None = None,
) -> RetrievalData:
    """Read any supported layout into a :class:`RetrievalData`.

    ``corpus`` adds extra passages (negative candidates besides all positives); for AutoRAG it is the corpus
    parquet that the QA file's doc ids refer to. ``dedupe=False`` (evaluation) keeps every query id and passage
    id of the source as its own entry even when texts are equal; normalization still applies to the texts.
    ``subset`` and ``revision`` pick a Hub dataset's config and revision (formats ``hub`` and ``mteb``).
    """
    source = path
    path, selection = split_source(path)
    fmt = detect_format(path, key) if fmt == "auto" else fmt
    if selection is not None and fmt != "squad":
        raise KoretError(f"{key}: {source}: an '#A:B' article range only applies to SQuAD JSON")
    if (subset or revision) and fmt not in ("hub", "mteb"):  # else they would be ignored without a word
        given = "subset" if subset else "revision"
        raise KoretError(f"{key}: {given} {subset or revision!r} picks a Hub dataset's config or revision, but "
                         f"{path} is read as format {fmt}", f"remove {given}, or set format: hub or mteb")
    builder = _Builder(normalize, source, dedupe)
    if fmt == "squad":
        _read_squad(builder, Path(path), key, limit, selection)
    elif fmt == "beir":
        _read_beir(builder, Path(path), split, key, limit)
    elif fmt == "mteb":
        _read_mteb(builder, path, subset, split, revision, key, limit)
    elif fmt == "autorag":
        _read_autorag(builder, Path(path), corpus, key, limit)
        corpus = None  # consumed as the doc-id source
    elif fmt == "text":
        raise KoretError(f"{key}: a text file (one passage per line) can only be an extra corpus (data.corpus)",
                         "give (query, positive) pairs in data.train")
    else:
        df = read_table(path, fmt, key, split, subset=subset, revision=revision)
        if is_candidates_table(df.columns):
            raise KoretError(f"{key}: {path} is koret mine's candidates.parquet (passage ids per query; columns: "
                             f"{', '.join(map(str, df.columns))}), not (query, positive) pairs",
                             "use the train.parquet beside it (koret filter writes a new one); koret train-reranker "
                             "reads candidates.parquet itself")
        qcol = _pick_column(df, query_column, 0, key, "data.query_column")
        pcol = _pick_column(df, positive_column, 1, key, "data.positive_column")
        if qcol == pcol:
            raise KoretError(f"{key}: query and positive column are both {qcol!r}", "set data.positive_column")
        if limit is not None:
            df = df.iloc[:limit]
        for row, (q, p) in enumerate(zip(df[qcol].tolist(), df[pcol].tolist(), strict=True)):
            qi = builder.add_query(q, where=f"row {row} column {qcol!r}")
            di = builder.add_doc(p, where=f"row {row} column {pcol!r}")
            builder.relate(qi, di, 1)
    n_positive_docs = len(builder.corpus)
    if corpus:
        for i, text in enumerate(iter_passages(corpus, corpus_format, corpus_column, "data.corpus")):
            builder.add_doc(text, where=f"passage {i}")
    data = builder.build(fmt)
    data.notes.extend(f"{n:,} {what}" for what, n in data.counts.items())
    if corpus:
        data.notes.append(f"extra corpus added {len(data.corpus) - n_positive_docs:,} passages")
    return data


def _read_squad(builder: _Builder, path: Path, key: str, limit: int | None, selection: slice | None) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KoretError(f"{key}: {path}: unreadable or corrupt JSON ({exc})") from exc
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list):
        raise KoretError(f"{key}: {path}: not SQuAD layout (no top-level 'data' list)", "set data.format")
    if selection is not None:
        total = len(articles)
        articles = articles[selection]
        if not articles:
            raise KoretError(f"{key}: {path}: article range {selection.start}:{selection.stop} selects no article "
                             f"(the file has {total})")
    rows = 0
    for a, article in enumerate(articles):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"data[{a}].paragraphs[{p}]"
            if "context" not in para:
                raise KoretError(f"{key}: {path}: {where} has no 'context'")
            di = builder.add_doc(para["context"], where=where + ".context")
            for q, qa in enumerate(para.get("qas", [])):
                if limit is not None and rows >= limit:
                    return
                if qa.get("is_impossible"):  # KorQuAD 2.0 / KLUE-MRC: the paragraph does not answer it
                    builder.count("unanswerable questions (is_impossible) skipped")
                    continue
                qi = builder.add_query(qa.get("question"), ext_id=qa.get("id"), where=f"{where}.qas[{q}].question")
                builder.relate(qi, di, 1)
                rows += 1


def split_source(path: str) -> tuple[str, slice | None]:
    """Split ``file.json#A:B`` into the path and a slice of SQuAD articles.

    KorQuAD-style sets must be split by article, never by question, or passages leak between train and eval:
    ``KorQuAD_v1.0_dev.json#0:112`` trains on articles 0-111, ``#112:`` evaluates on the rest.
    """
    if "#" in path and not Path(path).exists():
        base, _, sel = path.rpartition("#")
        m = re.fullmatch(r"(-?\d*):(-?\d*)", sel.strip())
        if m:
            start = int(m.group(1)) if m.group(1) else None
            stop = int(m.group(2)) if m.group(2) else None
            return base, slice(start, stop)
    return path, None


def _read_beir(builder: _Builder, root: Path, split: str, key: str, limit: int | None) -> None:
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").exists() else []
        raise KoretError(f"{key}: {qrels_path} not found (available splits: {', '.join(available) or 'none'})",
                         "set data.split")
    for i, rec in enumerate(_iter_jsonl(root / "corpus.jsonl", key)):
        if "_id" not in rec:
            raise KoretError(f"{key}: {root / 'corpus.jsonl'}: line {i + 1} has no '_id'")
        text = " ".join(str(x) for x in (rec.get("title") or "", rec.get("text") or "") if x).strip()
        builder.add_doc(text, ext_id=str(rec["_id"]), where=f"corpus.jsonl line {i + 1}")
    query_text: dict[str, str] = {}
    for i, rec in enumerate(_iter_jsonl(root / "queries.jsonl", key)):
        if "_id" not in rec or "text" not in rec:
            raise KoretError(f"{key}: {root / 'queries.jsonl'}: line {i + 1} needs '_id' and 'text'")
        query_text[str(rec["_id"])] = rec["text"]
    _relate_judgments(builder, query_text, _beir_judgments(qrels_path, key), qrels_path, "queries.jsonl", limit, key)


def _beir_judgments(qrels_path: Path, key: str) -> Iterable[tuple[str, str, int]]:
    """(query id, doc id, grade) of a qrels TSV (a header line, TREC's four columns and blank lines allowed)."""
    with open(qrels_path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and not (len(parts) >= 3 and _is_int(parts[-1])):
                continue  # header
            if not line.strip():
                continue
            if len(parts) == 4:  # TREC layout: qid 0 docid grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3 or not _is_int(parts[2]):
                raise KoretError(f"{key}: {qrels_path}: line {n + 1}: expected query-id, corpus-id, score")
            yield parts[0], parts[1], int(parts[2])


def _relate_judgments(builder: _Builder, query_text: dict[str, str], judgments: Iterable[tuple[str, str, int]],
                      where: Any, queries_where: str, limit: int | None, key: str) -> None:
    """Add each judged query (in the judgments' order, the first ``limit``) and its judgments; judgments naming
    an unknown query or passage id are one error at the end (:func:`_unknown_ids_error`)."""
    unknown_q: list[str] = []
    unknown_d: list[str] = []
    for qid, did, grade in judgments:
        d = builder.doc_by_id(did)
        if qid not in query_text:
            unknown_q.append(qid)
            continue
        if d is None:
            unknown_d.append(did)
            continue
        q = builder.query_by_id(qid)
        if q is None:
            if limit is not None and len(builder.queries) >= limit:
                continue
            q = builder.add_query(query_text[qid], ext_id=qid, where=f"{queries_where} id {qid}")
        builder.relate(q, d, grade)
    _unknown_ids_error(key, where, unknown_d, unknown_q)


def _read_mteb(builder: _Builder, path: str, subset: str | None, split: str, revision: str | None, key: str,
               limit: int | None) -> None:
    """An mteb retrieval set (a Hub dataset id or a local folder in its layout: :mod:`koret.hub_layouts`)."""
    from koret.hub_layouts import read_mteb

    hub = read_mteb(path, subset, split, revision, key)
    for i, (doc_id, text) in enumerate(hub.corpus):
        builder.add_doc(text, ext_id=doc_id, where=f"corpus row {i} (id {doc_id})")
    where = f"{path} ({', '.join(hub.configs)}, split {split})"
    _relate_judgments(builder, hub.queries, hub.qrels, where, "queries", limit, key)


def _unknown_ids_error(key: str, where: Path | str, docs: list[str], queries: list[str] | None = None) -> None:
    """One line saying how many judgments name unknown doc / query ids, with a few examples of each."""
    parts = []
    for ids, what in ((docs, "doc"), (queries or [], "query")):
        if ids:
            shown = ", ".join(repr(i) for i in list(dict.fromkeys(ids))[:5])
            parts.append(f"{len(ids):,} name unknown {what} ids (e.g. {shown})")
    if parts:
        raise KoretError(f"{key}: {where}: judgments that {' and '.join(parts)}",
                         "fix the qrels, or add the missing documents / queries")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _iter_jsonl(path: Path, key: str) -> Iterable[dict[str, Any]]:
    if not path.exists():
        raise KoretError(f"{key}: file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KoretError(f"{key}: {path}: line {n + 1}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise KoretError(f"{key}: {path}: line {n + 1}: expected a JSON object")
            yield rec


def _flatten(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        items = list(value)
    except TypeError:
        return [value]
    out: list[Any] = []
    for item in items:
        out.extend(_flatten(item))
    return out


def _read_autorag(builder: _Builder, path: Path, corpus: str | None, key: str, limit: int | None) -> None:
    if path.is_dir():
        qa_path, corpus_path = path / "qa.parquet", path / "corpus.parquet"
    else:
        qa_path = path
        corpus_path = Path(corpus) if corpus else path.parent / "corpus.parquet"
    if not corpus_path.exists():
        raise KoretError(f"{key}: AutoRAG corpus not found: {corpus_path}", "set data.corpus to the corpus parquet")
    cdf = read_table(str(corpus_path), "parquet", "data.corpus")
    for col in ("doc_id", "contents"):
        if col not in cdf.columns:
            raise KoretError(f"data.corpus: {corpus_path}: column {col!r} not found; available columns: "
                             f"{', '.join(map(str, cdf.columns))}")
    for i, (doc_id, text) in enumerate(zip(cdf["doc_id"].tolist(), cdf["contents"].tolist(), strict=True)):
        builder.add_doc(text, ext_id=str(doc_id), where=f"corpus row {i}")
    qdf = read_table(str(qa_path), "parquet", key)
    for col in ("query", "retrieval_gt"):
        if col not in qdf.columns:
            raise KoretError(f"{key}: {qa_path}: column {col!r} not found; available columns: "
                             f"{', '.join(map(str, qdf.columns))}")
    qids = qdf["qid"].tolist() if "qid" in qdf.columns else [None] * len(qdf)
    unknown: list[str] = []
    for i, (qid, query, gt) in enumerate(zip(qids, qdf["query"].tolist(), qdf["retrieval_gt"].tolist(), strict=True)):
        if limit is not None and i >= limit:
            break
        q = builder.add_query(query, ext_id=qid, where=f"row {i} column 'query'")
        for doc_id in _flatten(gt):
            d = builder.doc_by_id(str(doc_id))
            if d is None:
                unknown.append(str(doc_id))
                continue
            builder.relate(q, d, 1)
    _unknown_ids_error(key, qa_path, unknown)


def iter_passages(path: str, fmt: str = "auto", column: str | None = None, key: str = "data.corpus") -> list[str]:
    """Passages of an extra corpus in any layout (a text file has one passage per line)."""
    fmt = detect_format(path, key) if fmt == "auto" else fmt
    p = Path(path)
    if fmt == "text":
        with open(p, encoding="utf-8") as fh:
            lines = [line.rstrip("\n") for line in fh if line.strip()]
        if not lines:
            raise KoretError(f"{key}: {path}: no passages (empty file)")
        return lines
    if fmt == "squad":
        return load_retrieval_data(path, "squad", key=key).corpus
    if fmt == "beir":
        return [" ".join(str(x) for x in (r.get("title") or "", r.get("text") or "") if x).strip()
                for r in _iter_jsonl(p / "corpus.jsonl", key)]
    if fmt == "autorag":
        cpath = p / "corpus.parquet" if p.is_dir() else p
        df = read_table(str(cpath), "parquet", key)
        column = column or "contents"
    else:
        df = read_table(path, fmt, key)
    if column is None:
        column = next((c for c in _TEXT_COLUMNS if c in df.columns), None)
        if column is None:  # the first column, but never a column of ids
            column = str(df.columns[0])
            why = _id_column(column, df[column].head(1000).tolist())
            if why:
                raise KoretError(f"{key}: column {column!r} (the first, taken when none is named) {why}, not passage "
                                 f"text; columns found: {', '.join(map(str, df.columns))}",
                                 "set data.corpus_column to the column that holds the passages")
    if column not in df.columns:
        raise KoretError(f"{key}: column {column!r} (data.corpus_column) not found; available columns: "
                         f"{', '.join(map(str, df.columns))}")
    return [t for t in df[column].tolist() if isinstance(t, str) and t.strip()]


SOURCE_OPTIONS = ("format", "query_column", "positive_column", "corpus", "corpus_format", "corpus_column", "split",
                  "limit", "subset", "revision")


def row_selection(n: int, section: Any) -> Any:
    """The rows of an ``n``-row source a data section uses, as sorted indices: ``sample`` rows drawn without
    replacement (numpy's generator seeded with ``sample_seed``), else the first ``limit``, else all. Pure."""
    import numpy as np

    sample, limit = getattr(section, "sample", None), getattr(section, "limit", None)
    if sample is not None and sample >= n:
        from koret.report import info

        info(f"data.sample: {sample:,} is not less than the {n:,} rows: every row is used")
    if sample is not None and sample < n:
        return np.sort(np.random.default_rng(getattr(section, "sample_seed", 0)).choice(n, size=sample, replace=False))
    return np.arange(n if limit is None else min(limit, n))


def load_section(section: Any, path_field: str = "train", *, prefix: str = "", dedupe: bool = True,
                 key: str | None = None) -> RetrievalData:
    """Read the source a config's ``data`` section names: ``section.<path_field>`` with the section's options.

    The one place the data sections of mine, train and eval meet the readers. A section that holds a second
    source names its options with a prefix (train's ``eval``, ``eval_format``, ``eval_split``, ``eval_corpus``);
    ``normalize`` is shared by the section's sources. Options a section does not have keep their defaults.
    ``key`` names the source in errors (default ``data.<path_field>``; an entry of ``data.sources`` passes its own).
    """
    path = getattr(section, path_field)
    key = key or f"data.{path_field}"
    if not path:
        raise KoretError(f"{key}: required key is missing", "set it to your (query, positive) data")
    options = {name: getattr(section, prefix + name) for name in SOURCE_OPTIONS if hasattr(section, prefix + name)}
    fmt = options.pop("format", "auto")
    data = load_retrieval_data(path, fmt, key=key, normalize=getattr(section, "normalize", "nfc"), dedupe=dedupe,
                               **options)
    if not prefix and getattr(section, "sample", None) is not None:  # limit is applied while reading
        data = data.with_rows(row_selection(len(data.pairs), section))
    return data
