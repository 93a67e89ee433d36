"""``koret push --dataset``: the hard negatives koret mine (or koret filter) wrote, as a Hugging Face dataset repo.

The repo holds ``train.parquet`` (anchor, positive, negative_1..N, the teacher's scores, and ``source`` when the
mine had several sources), ``stats.json`` and the score plots, with ``dataset.candidates`` also
``candidates.parquet`` and ``corpus.parquet`` (every query's candidates with the teacher's scores, and the
passages they index). Its card (README.md, written through huggingface_hub's ``DatasetCard``) states what the
mine stage recorded: the sources with their licenses and row counts, the teacher and its prompts, the filter and
its settings, the stats. Publishing data needs its license: a source without one (``dataset.licenses.<name>`` or
``dataset.license``) is refused before anything is staged.

Token, staging, retries and the upload are :mod:`koret.push`'s: the token comes from ``HF_TOKEN`` or the stored
login, goes to ``HfApi`` only and is never printed or written; ``--dry-run DIR`` writes exactly the folder that
would be uploaded and touches no network.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koret.config import DatasetPushConfig, PushConfig
from koret.errors import KoretError
from koret.io import read_record, write_text
from koret.push import CITATIONS, _fmt, _mining_section, check_repo_id, replace_folder, staged, upload

SHARED_CORPUS = "data.corpus"  # the name of the shared extra passages (``data.corpus``) among the sources


@dataclass
class MinedSource:
    """One source of the mined data: its name, where it was read from, its license and its rows in train.parquet."""

    name: str
    data: str
    license: str
    rows: int | None  # None: passages only (the shared data.corpus), no rows of its own


@dataclass
class MinedData:
    """What a mine folder holds, checked: its files, records and sources (each with its license)."""

    folder: Path
    files: list[Path]
    stats: dict[str, Any]
    config: dict[str, Any]
    sources: list[MinedSource]
    rows: int
    columns: list[str]


def _source_name(path: str) -> str:
    """A one-source mine's name for its source: the file's stem or the folder's name (``#A:B`` dropped)."""
    p = Path(str(path).split("#")[0].rstrip("/"))
    return (p.name if p.is_dir() else p.stem) or str(path)


def _rows_per_source(train: Path) -> tuple[int, list[str], dict[str, int]]:
    """(rows, columns, rows per value of the ``source`` column: empty without one) of ``train.parquet``."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(train)
        rows = pq.read_metadata(train).num_rows
        counts: dict[str, int] = {}
        if "source" in schema.names:
            for name in pq.read_table(train, columns=["source"]).column("source").to_pylist():
                counts[name] = counts.get(name, 0) + 1
    except Exception as exc:  # pyarrow raises its own types for a corrupt file
        raise KoretError(f"dataset.mine_dir: {train}: unreadable parquet ({str(exc).splitlines()[0]})") from exc
    return rows, list(schema.names), counts


def mined_sources(config: dict[str, Any], counts: dict[str, int], rows: int,
                  ds: DatasetPushConfig) -> list[MinedSource]:
    """The sources of a mine's ``config.yaml`` with their licenses and rows; a source without a license, or a
    license naming no source, is a one-line error naming the key."""
    data = config.get("data") or {}
    entries = [(s["name"], str(s.get("train")), counts.get(s["name"], 0)) for s in data.get("sources") or []]
    if not entries:
        entries = [(_source_name(data.get("train") or "data"), str(data.get("train")), rows)]
    if data.get("corpus"):
        entries.append((SHARED_CORPUS, str(data["corpus"]), None))
    names = [name for name, _, _ in entries]
    unknown = sorted(set(ds.licenses) - set(names))
    if unknown:
        raise KoretError(f"dataset.licenses.{unknown[0]}: no source of the mined data is named {unknown[0]!r} "
                         f"(sources: {', '.join(names)})", "name the sources as the mine config does")
    out = []
    for name, path, n in entries:
        license = next((x.strip() for x in (ds.licenses.get(name), ds.license) if x and x.strip()), "")
        if not license:
            raise KoretError(f"dataset.licenses.{name}: no license for source {name!r} ({path}); mined data is "
                             "published only with the license of what it was mined from",
                             f"set dataset.licenses.{name}=<Hub license id, e.g. cc-by-sa-4.0>, or dataset.license "
                             "for every source")
        out.append(MinedSource(name, path, license, n))
    return out


def gather(ds: DatasetPushConfig, mine_dir: Path) -> MinedData:
    """Read and check a mine (or filter) folder: train.parquet, stats.json, config.yaml, the licenses, and with
    ``ds.candidates`` the candidates and corpus files (beside it, or where a filter folder's candidates came from)."""
    if not mine_dir.is_dir():
        raise KoretError(f"dataset.mine_dir: folder not found: {mine_dir}", "run koret mine first, or give --dataset "
                                                                           "the folder it wrote")
    train, stats_path, config_path = (mine_dir / n for n in ("train.parquet", "stats.json", "config.yaml"))
    for f in (train, stats_path, config_path):
        if not f.exists():
            raise KoretError(f"dataset.mine_dir: {mine_dir} has no {f.name} (not a folder koret mine or koret "
                             "filter wrote)", "give the folder koret mine or koret filter wrote")
    stats, config = read_record(stats_path) or {}, read_record(config_path) or {}
    data = config.get("data") or {}
    if not (data.get("train") or data.get("sources")) and stats.get("candidates"):
        # a koret filter run given no mine config: the sources are those of the mine its candidates came from
        origin = read_record(Path(stats["candidates"]).parent / "config.yaml") or {}
        if origin.get("data"):
            config = {**config, "data": origin["data"]}
    rows, columns, counts = _rows_per_source(train)
    sources = mined_sources(config, counts, rows, ds)
    files = [train, stats_path, *sorted(mine_dir.glob("scores*.png"))]
    if ds.candidates:
        where = mine_dir
        source = stats.get("candidates") or (config.get("filter") or {}).get("candidates")
        if not (mine_dir / "candidates.parquet").exists() and source:  # a filter folder: its mine folder's
            where = Path(source) if Path(source).is_dir() else Path(source).parent
        extra = [where / "candidates.parquet", where / "corpus.parquet"]
        missing = [f for f in extra if not f.exists()]
        if missing:
            raise KoretError(f"dataset.candidates: {missing[0]} not found", "push the folder koret mine wrote, or "
                             "set dataset.candidates=false")
        files += extra
    return MinedData(mine_dir, files, stats, config, sources, rows, columns)


# --------------------------------------------------------------------------------------------- card


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if n < bound:
            return label
    return "10M<n<100M"


def _prompts(stats: dict[str, Any], config: dict[str, Any]) -> dict[str, str | None]:
    """The teacher's prompts as mine used them (stats.json's resolved texts, else the config's keys)."""
    teacher = stats.get("teacher") or {}
    conf = config.get("teacher") or {}
    return {side: teacher.get(f"{side}_prompt", conf.get(f"{side}_prompt"))
            or (f"prompt named {conf[f'{side}_prompt_name']!r}" if conf.get(f"{side}_prompt_name") else None)
            for side in ("query", "passage")}


def _hub_ids(sources: list[MinedSource]) -> list[str]:
    return [s.data for s in sources if s.data.count("/") == 1 and not s.data.startswith((".", "/", "~"))
            and not Path(s.data.split("#")[0]).exists()]


def build_dataset_card(ds: DatasetPushConfig, mined: MinedData, repo_id: str | None) -> str:
    """The dataset card (README.md): YAML metadata through ``DatasetCardData`` and a body of recorded facts."""
    from huggingface_hub import DatasetCard, DatasetCardData

    stats, config = mined.stats, mined.config
    settings = stats.get("settings") or {}
    teacher = (stats.get("teacher") or {}).get("model") or (config.get("teacher") or {}).get("model")
    prompts = _prompts(stats, config)
    licenses = sorted({s.license for s in mined.sources})
    names = {f.name for f in mined.files}
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "train.parquet"}]}]
    configs += [{"config_name": n, "data_files": [{"split": "train", "path": f"{n}.parquet"}]}
                for n in ("candidates", "corpus") if f"{n}.parquet" in names]
    repo_name = (repo_id or "koret-hard-negatives").split("/")[-1]
    card_data = DatasetCardData(
        language=["ko"], license=licenses[0] if len(licenses) == 1 else licenses, pretty_name=repo_name,
        size_categories=[_size_category(mined.rows)], task_categories=["sentence-similarity", "text-retrieval"],
        tags=["koret", "hard-negatives", "retrieval", "korean", "sentence-transformers"],
        source_datasets=_hub_ids(mined.sources) or None, configs=configs,
        koret={"teacher": teacher, "prompts": prompts, "score_kind": stats.get("score_kind"),
               "filter": settings, "rows": mined.rows,
               "sources": [{"name": s.name, "data": s.data, "license": s.license, "rows": s.rows}
                           for s in mined.sources]},
    )
    negatives = settings.get("num_negatives")
    with_rows = [s for s in mined.sources if s.rows is not None]
    body = [f"# {repo_name}", "",
            f"Hard negatives for training Korean retrievers, mined with koret: {mined.rows:,} rows of (anchor, "
            f"positive, {negatives} negatives) with the teacher `{teacher}`'s scores, from {len(with_rows)} "
            f"source(s), filtered with {settings.get('strategy', '?')}.", "",
            "```python", "from datasets import load_dataset", "",
            f'rows = load_dataset("{repo_id or "OWNER/NAME"}", split="train")', "```", "",
            "## Sources", "", "| source | data | license | rows in train.parquet |", "| --- | --- | --- | ---: |",
            *[f"| {s.name} | `{s.data}` | {s.license} | {'passages only' if s.rows is None else f'{s.rows:,}'} |"
              for s in mined.sources], "",
            "Each row's negatives come from its own source's passages"
            + (" and the shared extra passages (`data.corpus`)." if any(s.name == SHARED_CORPUS for s in mined.sources)
               else ".") + (" The `source` column names each row's source." if "source" in mined.columns else ""),
            "", "## Files", "", "| file | what |", "| --- | --- |",
            "| train.parquet | " + ", ".join(f"`{c}`" for c in mined.columns) + " (`scores`: the teacher's score of "
            "the positive, then of each negative) |",
            "| stats.json | what koret mine recorded: counts, filter, score distributions, timings |"]
    body += [f"| {f} | {f[len('scores-'):-len('.png')] + ': ' if f.startswith('scores-') else ''}the teacher's "
             "scores of positives and chosen negatives |" for f in sorted(names) if f.endswith(".png")]
    if "candidates.parquet" in names:
        body += ["| candidates.parquet | every query's candidates (passage ids) with the teacher's scores, before "
                 "filtering |", "| corpus.parquet | the passages the ids of candidates.parquet index |"]
    body += ["", "## Teacher and prompts", "", "| | |", "| --- | --- |", f"| teacher | `{teacher}` |",
             *[f"| {side} prompt | {f'`{p!r}`' if p and not p.startswith('prompt named') else p or 'none'} |"
               for side, p in prompts.items()],
             f"| scores | {stats.get('score_kind', '?')} |", "",
             "## Filter settings", "", "| setting | value |", "| --- | --- |",
             *[f"| {k} | {v} |" for k, v in settings.items()], ""]
    body += _mining_section(stats, config) + _by_source(stats)
    if "scores.png" in names:
        body += ["![the teacher's scores of positives and chosen negatives](scores.png)", ""]
    body += ["## Citation", "", CITATIONS, ""]
    return str(DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _by_source(stats: dict[str, Any]) -> list[str]:
    """A several-source mine's figures per source (stats.json's ``sources``), as its closing table shows them."""
    per = stats.get("sources") or {}
    if not per:
        return []
    rows = [[name, st.get("queries"), st.get("rows_in"), st.get("rows_out"), (st.get("shortage") or {}).get("rows"),
             (st.get("scores") or {}).get("positive", {}).get("p50"), (st.get("scores") or {}).get("negative", {})
             .get("p50")] for name, st in per.items()]
    return ["### By source", "", "| source | queries | rows in | rows written | rows short of negatives | median "
            "positive score | median negative score |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *["| " + " | ".join("?" if v is None else _fmt(v) for v in row) + " |" for row in rows], ""]


# --------------------------------------------------------------------------------------------- stage and push


def stage_dataset(ds: DatasetPushConfig, mined: MinedData, repo_id: str | None, dest: Path) -> list[str]:
    """Write the folder that would be uploaded (the mined files and README.md) to ``dest``."""
    card = build_dataset_card(ds, mined, repo_id)

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in mined.files:
            shutil.copy2(f, tmp / f.name)
        write_text(tmp / "README.md", card)

    return replace_folder(dest, fill)


def push_dataset(cfg: PushConfig, dry_run: str | Path | None = None, show_card: bool = True) -> dict[str, Any]:
    """Upload (or, with ``dry_run`` or ``push.dry_run: true``, only stage) the mined data of ``cfg.dataset``."""
    ds = cfg.dataset or DatasetPushConfig()
    mined = gather(ds, Path(ds.mine_dir or cfg.mine_dir or "runs/mine"))
    if dry_run is None and cfg.dry_run:
        dry_run = ds.dry_run_dir
    if dry_run is not None:
        dest = Path(dry_run)
        return {**staged(dest, stage_dataset(ds, mined, ds.repo_id, dest), ds.repo_id, show_card),
                "sources": [s.__dict__ for s in mined.sources]}
    repo_id = check_repo_id(ds.repo_id, "dataset.repo_id", "your-name/koret-ko-hard-negatives")
    target = cfg.model_copy(update={"repo_id": repo_id})
    return upload(target, lambda dest: stage_dataset(ds, mined, repo_id, dest), "dataset", ds.commit_message)
