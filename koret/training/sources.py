"""Training on several named sources (``data.sources``, or a mined train.parquet with a ``source`` column): the
parts both recipes share.

Each source is one dataset of the ``DatasetDict`` given to sentence-transformers' trainer (multi-dataset
training), so every batch holds rows of one source and in-batch negatives never cross sources. The trainer asks
for a multi-dataset batch sampler; :class:`SourceBatches` is koret's, drawing sources as
:func:`koret.sources.batch_plan` says (``data.sampler`` proportional with weights, or round_robin): the library's
PROPORTIONAL sampler weighs sources by their size only. With several processes, each draw is one batch per
process of the same source. The loss is a dict keyed by source name (the same loss object for every source
unless a source needs its own), which makes the trainer tag every batch with its source's name; koret reads that
tag to log the loss of each source (:func:`log_source_losses`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from koret import dist
from koret.errors import KoretError
from koret.io import read_record
from koret.sources import batch_plan

SOURCE_COLUMN = "source"  # a several-source mine's train.parquet / candidates.parquet


@dataclasses.dataclass
class SourceRows:
    """One source of a training run: its name, file, weight, its own config entry (None when the source came from
    a mined file's source column) and the mine records beside its file."""

    name: str
    train: str
    weight: float
    entry: Any
    mined_config: dict[str, Any] | None
    rows: int = 0
    num_negatives: int = 0

    def record(self, prompts: tuple[str, str] | None = None, batches: int | None = None) -> dict[str, Any]:
        """What metrics.json (and the model card) say of this source."""
        out: dict[str, Any] = {"name": self.name, "train": self.train, "rows": self.rows, "weight": self.weight,
                               "num_negatives": self.num_negatives,
                               "filter": mined_filter(self.train, self.name, self.num_negatives)}
        if prompts is not None:
            out["query_prompt"], out["passage_prompt"] = prompts
        if batches is not None:
            out["batches"] = batches
        return out


def mined_filter(train: str, name: str | None = None, num_negatives: int | None = None) -> dict[str, Any] | None:
    """The filter that wrote a mined file, from the stats.json beside it: its settings, and the rows written (of
    the source ``name`` when the mine had several). A candidates.parquet (train-reranker) is read with the naive
    rule: the best-scored candidates that are not positives."""
    from koret.data import split_source

    path = Path(split_source(train)[0])
    if path.name == "candidates.parquet":
        return {"strategy": "naive", "num_negatives": num_negatives, "from": "candidates.parquet"}
    stats = read_record((path if path.is_dir() else path.parent) / "stats.json")
    if not stats or "settings" not in stats:
        return None
    part = (stats.get("sources") or {}).get(name or "", stats)
    return {**{k: stats["settings"].get(k) for k in ("strategy", "perc", "margin", "max_score", "min_score",
                                                     "num_negatives", "scale") if k in stats["settings"]},
            "rows_in": part.get("rows_in"), "rows_out": part.get("rows_out")}


def select_source(df: Any, path: str, key: str, name: str | None) -> tuple[Any, list[str] | None]:
    """The rows of a table that belong to source ``name`` when the table is a several-source mine's (its parquet
    metadata names the sources, :data:`koret.candidates.SOURCES_KEY`); and, with no name, every row's source
    (to split the file), or None for an ordinary table."""
    from koret.candidates import read_source_names

    names = read_source_names(path)
    if not names or SOURCE_COLUMN not in df.columns:
        return df, None
    if name is None:
        return df, names
    check_source_name(key, path, names, name)
    return df[df[SOURCE_COLUMN] == name], None


def check_source_name(key: str, path: str, names: list[str], name: str) -> None:
    """A one-line error when a several-source mine's file (holding ``names``) has no source ``name``."""
    if name not in names:
        raise KoretError(f"{key}: {path} holds the sources {', '.join(names)} (its source column), not {name!r}",
                         "name this source after one of them, or point it at another file")


def split_rows(columns: dict[str, list[Any]], row_sources: list[str], names: list[str]) -> dict[str, dict[str, list]]:
    """Columns split by each row's source, in the order of ``names`` (sources without rows left out)."""
    out: dict[str, dict[str, list]] = {}
    for name in names:
        keep = [i for i, s in enumerate(row_sources) if s == name]
        if keep:
            out[name] = {col: [values[i] for i in keep] for col, values in columns.items()}
    return out


def common_mined_config(sources: list[SourceRows], needs_teacher: bool) -> dict[str, Any] | None:
    """The mine config whose teacher guides GIST: the one every mined source shares. Sources mined with different
    teachers cannot share one guide: a one-line error when the guide would be the teacher (``needs_teacher``)."""
    import json

    mined = [(s.name, s.mined_config) for s in sources if s.mined_config]
    teachers = {json.dumps(mc.get("teacher"), sort_keys=True): name for name, mc in mined}
    if len(teachers) > 1 and needs_teacher:
        raise KoretError(f"loss.guide: the sources were mined with different teachers (sources "
                         f"{', '.join(teachers.values())} differ), and the default guide is the mining teacher",
                         "set loss.guide to one model, or 'student'")
    return mined[0][1] if mined else None


def no_rows_error(key: str, train: str, name: str | None) -> KoretError:
    what = f"source {name}: " if name else ""
    return KoretError(f"{key}: {what}{train}: no rows (empty dataset, or none left after data.limit / data.sample)",
                      "check the file (and, for a mined file, that it holds rows of this source)")


def num_rows(dataset: Any) -> int:
    """Rows of a Dataset, or of every dataset of a DatasetDict."""
    from datasets import DatasetDict

    return sum(len(d) for d in dataset.values()) if isinstance(dataset, DatasetDict) else len(dataset)


def negatives_text(sources: list[SourceRows]) -> int | str:
    """The hard negatives per row, one number when every source has the same, else their range (``3-7``)."""
    counts = sorted({s.num_negatives for s in sources})
    return counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def column_prompts(dataset: Any, default: tuple[str, str], per_source: dict[str, tuple[str, str]],
                   exclude: tuple[str, ...] = (), query_column: str = "anchor") -> dict[str, Any]:
    """The trainer's ``prompts`` argument: the query prompt for the anchor column, the passage prompt for the
    others; with several sources, a mapping per source name (sentence-transformers resolves it by each batch's
    source). Empty when no text column has a prompt."""

    def by_column(columns: list[str], prompts: tuple[str, str]) -> dict[str, str]:
        return {c: (prompts[0] if c == query_column else prompts[1]) for c in columns if c not in exclude}

    if per_source:
        out = {name: by_column(dataset[name].column_names, per_source[name]) for name in dataset}
        return out if any(p for cols in out.values() for p in cols.values()) else {}
    out = by_column(dataset.column_names, default)
    return out if any(out.values()) else {}


def saved_source_prompts(per_source: dict[str, tuple[str, str]], default: tuple[str, str]) -> dict[str, str]:
    """The prompts a model trained on several sources is saved with besides its ``query`` / ``document`` ones:
    ``query_<source>`` / ``document_<source>`` for each source whose prompt differs from the model section's."""
    out = {}
    for name, (q, p) in per_source.items():
        if q != default[0] and q:
            out[f"query_{name}"] = q
        if p != default[1] and p:
            out[f"document_{name}"] = p
    return out


# --------------------------------------------------------------------------------------------- the sampler


class SourceBatches:
    """The multi-dataset batch sampler of a several-source run (see the module doc and
    :func:`koret.sources.batch_plan`). Each draw yields ``group`` consecutive batches of one source (the number
    of processes: accelerate hands the i-th batch of every ``group`` to process i), offset into the trainer's
    concatenation of the sources. A source drawn more often than it has batches starts its sampler over,
    reshuffled; with round_robin the epoch ends when a source has no batch left."""

    def __init__(self, dataset: Any, batch_samplers: list[Any], weights: list[float], sampler: str, seed: int,
                 group: int = 1) -> None:
        self.batch_samplers = batch_samplers
        self.weights = list(weights)
        self.sampler = sampler
        self.seed = int(seed or 0)
        self.group = max(1, int(group))
        self.offsets = [0]
        for d in dataset.datasets:
            self.offsets.append(self.offsets[-1] + len(d))
        # several processes: batches vary in size and come in rounds (see VariableSizeBatches)
        self.batch_size = None if self.group > 1 else getattr(batch_samplers[0], "batch_size", None)
        self.drop_last = False
        self.epoch = 0

    def draws(self) -> list[int]:
        """Draws each source has in one epoch: its batches, in rounds of ``group``."""
        return [len(s) // self.group for s in self.batch_samplers]

    def plan(self) -> Any:
        return batch_plan(self.draws(), self.weights, self.sampler, self.seed, self.epoch)

    def __len__(self) -> int:
        return len(self.plan()) * self.group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.batch_samplers:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def __iter__(self) -> Any:
        iterators: list[Any] = [None] * len(self.batch_samplers)
        passes = [0] * len(self.batch_samplers)

        def restart(s: int) -> None:
            sampler = self.batch_samplers[s]
            if passes[s] and hasattr(sampler, "set_epoch"):  # a new pass over the source: a new shuffle
                sampler.set_epoch(self.epoch + 100_000 * passes[s])
            passes[s] += 1
            iterators[s] = iter(sampler)

        for s in self.plan().tolist():
            batches = []
            for _ in range(self.group):
                if iterators[s] is None:
                    restart(s)
                batch = next(iterators[s], None)
                if batch is None:
                    if self.sampler == "round_robin":  # the library's: the epoch ends when a source runs out
                        self._reset_epochs()
                        return
                    restart(s)
                    batch = next(iterators[s], None)
                    if batch is None:  # an empty source (none is: its rows were checked)
                        break
                batches.append(batch)
            if len(batches) < self.group:
                break
            for batch in batches:
                yield [int(i) + self.offsets[s] for i in batch]
        self._reset_epochs()

    def _reset_epochs(self) -> None:
        for s in self.batch_samplers:
            if hasattr(s, "set_epoch"):
                s.set_epoch(self.epoch)


def use_sources(trainer: Any, weights: list[float], sampler: str, callback: Any) -> None:
    """A trainer whose train DatasetDict is drawn by :class:`SourceBatches` and whose callback logs each source's
    loss. Call after :func:`koret.training.common.prepare`."""
    made: list[SourceBatches] = []

    def get_multi_dataset_batch_sampler(dataset: Any, batch_samplers: list[Any], generator: Any = None,
                                        seed: int | None = 0) -> SourceBatches:
        made.append(SourceBatches(dataset, batch_samplers, weights, sampler, seed or 0, dist.world_size()))
        return made[-1]

    trainer.get_multi_dataset_batch_sampler = get_multi_dataset_batch_sampler
    trainer.add_callback(source_callback(made, callback))
    log_source_losses(trainer, callback)


BATCHES_FILE = "koret_source_batches.json"  # in each checkpoint: the main process's batches of each source so far


def source_callback(made: list[SourceBatches], counts: Any) -> Any:
    """The trainer callback of a several-source run: it tells the sampler (the last one ``made``) its epoch at the
    start of every epoch, and saves ``counts.source_batches`` with every checkpoint (:func:`resume_source_batches`).

    The trainer tells the epoch itself, except when it resumes in the middle of an epoch on several processes:
    accelerate's ``SkipBatchSampler(BatchSamplerShard(sampler))`` passes ``set_epoch`` on to neither, and the
    resumed epoch would draw epoch 0's plan and shuffles."""
    from transformers import TrainerCallback

    from koret.io import write_json

    class SourceEpochs(TrainerCallback):
        def __init__(self) -> None:
            self.epoch: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.epoch = None

        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            # the first epoch of this call is the one the (resumed) state is in, then one more each time
            self.epoch = int(state.epoch or 0) if self.epoch is None else self.epoch + 1
            if made:
                made[-1].set_epoch(self.epoch)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and counts.source_batches and folder.is_dir():
                write_json(folder / BATCHES_FILE, counts.source_batches)

    return SourceEpochs()


def resume_source_batches(callback: Any, checkpoint: str | None) -> None:
    """A run resumed from ``checkpoint`` counts each source's batches on from the checkpoint's count."""
    record = read_record(Path(checkpoint) / BATCHES_FILE) if checkpoint else None
    if record:
        callback.source_batches = {str(k): int(v) for k, v in record.items()}


def log_source_losses(trainer: Any, callback: Any) -> None:
    """Record the loss of every training batch under its source's name (the ``dataset_name`` the trainer adds to
    each batch of a DatasetDict with a dict loss) in ``callback.source_losses``; the callback averages them at
    each log (``loss_by_source`` in metrics.json's loss_curve). The main process's own batches: every process
    trains on the same source at each step."""
    compute = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        name = inputs.get("dataset_name")
        out = compute(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if name is not None and model.training:
            loss = out[0] if isinstance(out, tuple) else out
            callback.add_source_loss(name, float(loss.detach().float()))
        return out

    trainer.compute_loss = compute_loss
