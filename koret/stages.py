"""The registry of stages: what ``koret run``, the CLI and ``koret config`` know about each stage, in one place.

A stage is its own module, named after its command (``koret train-reranker`` is ``koret/train_reranker.py``;
``koret eval`` is ``koret/evaluate.py``), with a run function taking its config; its config class is named after
its ``koret run`` section (``reranker:`` is :class:`~koret.config.RerankerConfig`); the model-kind helpers it
uses live in ``koret/training/`` (``biencoder.py``, ``crossencoder.py``: the reranker is a cross-encoder), and
pure rules in leaf modules (``filter_rules.py``, ``metrics.py``). The entry here names its config schema, how
to run it, the outputs that mark it as done, the input files and models whose change reruns it, its key figure
for the summary table, and whether it uses every process of a launched run. Adding a stage is one entry here plus its module. Run functions are imported when called, so
reading the registry loads no model library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from koret.config import (
    EvalConfig,
    FilterConfig,
    MineConfig,
    ModelConfig,
    PushConfig,
    RerankerConfig,
    TeacherConfig,
    TrainConfig,
    validate,
)
from koret.errors import KoretError


@dataclass(frozen=True)
class Stage:
    name: str
    schema: type
    run: str  # "module:function", called with the stage's config
    outputs: Callable[[Any], list[Path]]
    inputs: Callable[[Any], list[str | None]]  # data files read from outside the run folder
    figure: Callable[[Any, Any], tuple[str, dict[str, Any]]]
    multi_process: bool = False  # uses every process of a launched run (else: the main one, the others wait)
    help: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    resumable: bool = False  # the run function takes resume= (checkpoints)
    cli: str | None = None  # the command's name when it differs from the stage's
    # koret run: the schema of the stage's section, and how the section becomes the stage's own config in the
    # chain (defaults from the upstream stages, outputs under run.dir): chain(section, upstream, root, source)
    section: type | None = None
    chain: Callable[[Any, dict[str, Any], Path, str], Any] | None = None
    # the models the stage loads (Hub ids or folders): a folder re-trained at the same path reruns the stage
    models: Callable[[Any], list[str | None]] = lambda cfg: []

    @property
    def command(self) -> str:
        return self.cli or self.name

    def call(self, cfg: Any, **kwargs: Any) -> Any:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)(cfg, **kwargs)


def _rows_figure(cfg: Any, stats: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"{stats['rows_out']:,} rows x {cfg.filter.num_negatives} negatives", {"rows": stats["rows_out"]}


def _train_figure(cfg: Any, m: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"final loss {m['final_loss']:.4f} ({m['steps']} steps)", {"final_loss": m["final_loss"]}


def _eval_figure(cfg: Any, res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """NDCG@10 of the first model -> the last retriever (each retriever named when there are more than two: a run
    of several rounds), and of each reranker over the retriever it reorders (a suite of sets: of their macro
    average, the top-level models of its metrics.json)."""
    models = res["models"]
    # NDCG@10, or at the largest k the corpus allowed (k is clamped to the corpus size)
    key = "ndcg@10" if "ndcg@10" in models[0]["metrics"] else f"ndcg@{max(res['k'])}"
    label = key.upper()
    retrievers = [m for m in models if "reranks" not in m]
    a, b = retrievers[0]["metrics"][key], retrievers[-1]["metrics"][key]
    figure = f"{label} {a:.4f} -> {b:.4f} ({b - a:+.4f})" if len(retrievers) > 1 else f"{label} {a:.4f}"
    if len(retrievers) > 2:  # several trained retrievers (run.rounds): each one named, the change over the first
        figure = f"{label} " + " -> ".join(f"{m['name']} {m['metrics'][key]:.4f}" for m in retrievers) + (
            f" ({b - a:+.4f} over {retrievers[0]['name']})")
    by_name = {m["name"]: m for m in models}
    for m in models:
        if "reranks" in m:
            base = by_name[m["reranks"]]["metrics"][key]
            figure += f"; {m['name']} {m['metrics'][key]:.4f} ({m['metrics'][key] - base:+.4f} over {m['reranks']})"
    if "sets" in res:
        figure += f" (average of {len(res['sets'])} sets)"
    return figure, {key: [m["metrics"][key] for m in models]}


def _push_figure(cfg: Any, res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if "dry_run" in res:
        return f"dry run: {res['dry_run']}", {"dry_run": res["dry_run"]}
    return res["url"], {"url": res["url"]}


# --------------------------------------------------------------------------------------------- the chain
#
# Each chain function turns a section into its stage's config given ``out``, the configs of the stages above it
# (by stage name: the last round's mine, filter and train; and under "rounds", every round's), and the folder the
# stage writes under: <run.dir>, or <run.dir>/round-<r> for round r > 1 of run.rounds.

ROUND_STAGES = ("mine", "filter", "train")  # what each round of run.rounds repeats, in this order
_PROMPT_KEYS = ("query_prompt", "query_prompt_name", "passage_prompt", "passage_prompt_name")


def round_root(root: Path, r: int) -> Path:
    """Where round ``r`` writes: <run.dir> for round 1 (a one-round run's layout), <run.dir>/round-<r> after it."""
    return root if r == 1 else root / f"round-{r}"


def trained_model(train: TrainConfig) -> Path:
    """The folder a chained train stage saves its model to."""
    return Path(train.args["output_dir"]) / "final"


def _upstream_train_parquet(out: dict[str, Any], what: str, source: str) -> str:
    """The hardest negatives at hand: the re-filtered train.parquet, else mine's (of the last round)."""
    upstream = out.get("filter") or out.get("mine")
    if upstream is None:
        raise KoretError(f"{source}: {what}.data.train is required when there is no mine section")
    return str(Path(upstream.output.dir) / "train.parquet")


def _chain_mine(section: MineConfig, out: dict[str, Any], root: Path, source: str) -> MineConfig:
    mine = section.model_copy(deep=True)
    mine.output.dir = str(root / "mine")
    return mine


def _chain_filter(section: FilterConfig, out: dict[str, Any], root: Path, source: str) -> MineConfig:
    if "mine" not in out:
        raise KoretError(f"{source}: the filter stage needs a mine section (it re-filters mine's candidates)")
    refilter_cfg = out["mine"].model_copy(deep=True)
    refilter_cfg.filter = section.model_copy(deep=True)
    refilter_cfg.filter.candidates = out["mine"].output.dir
    refilter_cfg.output.dir = str(root / "filter")
    return validate(MineConfig, refilter_cfg.model_dump(mode="json"), f"{source}: filter")


def _source_paths(data: Any) -> list[str | None]:
    """The files of a data section's named sources (``data.sources``): inputs of the stage."""
    return [x for s in data.sources for x in (s.train, getattr(s, "corpus", None))]


def _check_mined_source(out: dict[str, Any], name: str, key: str) -> None:
    """A source without its own train takes its rows from the run's mined file: the mine must have read it as one
    of its ``data.sources`` (checked before anything runs; a one-source mine's file would give every such source
    all of its rows)."""
    mined = [s.name for s in (out.get("filter") or out["mine"]).data.sources]
    if not mined:
        raise KoretError(f"{key}: unset, and the run's mine reads one source (mine.data.train): its train.parquet "
                         f"has no source column to take {name}'s rows from",
                         "give this source its own train, or list the sources in mine.data.sources")
    if name not in mined:
        raise KoretError(f"{key}: unset, and the run's mine has the sources {', '.join(mined)}, not {name!r}",
                         "name this source after one of them, or give it its own train")


def _chain_trainer(name: str) -> Callable[[Any, dict[str, Any], Path, str], Any]:
    """train and reranker: data.train defaults to the hardest negatives upstream (so does each of data.sources
    without its own train: a several-source mine's train.parquet holds every source's rows), outputs go to
    <run.dir>/<name>."""

    def chain(section: Any, out: dict[str, Any], root: Path, source: str) -> Any:
        cfg = section.model_copy(deep=True)
        for entry in cfg.data.sources:
            if not entry.train:
                entry.train = _upstream_train_parquet(out, name, source)
                _check_mined_source(out, entry.name, f"{source}: {name}.data.sources.{entry.name}.train")
        if not cfg.data.train and not cfg.data.sources:
            cfg.data.train = _upstream_train_parquet(out, name, source)
        cfg.args = {**cfg.args, "output_dir": str(root / name)}
        return cfg

    return chain


def _trained_label(ev: EvalConfig, trained_path: Path) -> str:
    """The label (as ``koret eval`` names it, labelled or not) of the retriever the run's reranker reorders: the
    run's trained model (the last round's ``train/final``) when ``eval.models`` lists it, else the last model (base
    first, trained last)."""
    from koret.evaluate import model_labels

    labels = model_labels(ev.models)
    trained = trained_path.expanduser().resolve()
    for m, label in zip(ev.models, labels, strict=True):
        if Path(m.name).expanduser().resolve() == trained:
            return label
    return labels[-1]


def _chain_eval(section: EvalConfig, out: dict[str, Any], root: Path, source: str) -> EvalConfig:
    ev = section.model_copy(deep=True)
    if not ev.models:
        if "train" not in out:
            raise KoretError(f"{source}: eval.models is required when there is no train section")
        trains = [r["train"] for r in out.get("rounds") or [{"train": out["train"]}]]
        t = trains[0]  # round 1 trained from the base model
        # the base model is read with the prompts training used; a trained one was saved with exactly those
        prompts = {k: getattr(t.model, k) for k in _PROMPT_KEYS}
        ev = validate(EvalConfig, {**ev.model_dump(mode="json"), "models": [
            {"name": t.model.name, "label": "base", "max_seq_length": t.model.max_seq_length, **prompts},
            *[{"name": str(trained_model(r)), "label": "trained" if len(trains) == 1 else f"round {i}",
               "max_seq_length": r.model.max_seq_length} for i, r in enumerate(trains, 1)]]}, f"{source}: eval")
    if "reranker" in out and not ev.rerankers:  # the trained retriever's top-k, reordered by the reranker
        trained = trained_model(out["train"]) if "train" in out else root / "train" / "final"
        ev = validate(EvalConfig, {**ev.model_dump(mode="json"), "rerankers": [
            {"name": str(root / "reranker" / "final"), "label": "reranker",
             "max_length": out["reranker"].model.max_length}],
            "rerank_model": ev.rerank_model or _trained_label(ev, trained)}, f"{source}: eval")
    ev.output.dir = str(root / "eval")
    return ev


class RunPushConfig(PushConfig):
    """The push stage's config in a run of several rounds: also what each round mined with and trained from, for
    the card (set by the chain; not a key of the push section)."""

    rounds: list[dict[str, str]] = Field(default_factory=list)


def _chain_push(section: PushConfig, out: dict[str, Any], root: Path, source: str) -> PushConfig:
    if section.dataset is not None:
        raise KoretError(f"{source}: push.dataset: koret run's push stage uploads the model",
                         "push the mined data after the run: koret push --dataset <run.dir>/mine")
    push = section.model_copy(deep=True)
    push.dry_run_dir = str(root / "push")
    if "train" in out:
        push.model = str(trained_model(out["train"]))
        push.train_dir = out["train"].args["output_dir"]
    if "eval" in out:
        push.eval_dir = out["eval"].output.dir
    if "filter" in out or "mine" in out:
        push.mine_dir = (out.get("filter") or out["mine"]).output.dir
    rounds = out.get("rounds") or []
    if len(rounds) > 1:  # a one-round run's push config stays as it was (its key, and so its record, too)
        push = RunPushConfig(**push.model_dump(), rounds=[
            {"teacher": str(r["mine"].teacher.model), "start": str(r["train"].model.name),
             "model": str(trained_model(r["train"]))} for r in rounds])
    return push


def chain_round(sections: dict[str, Any], previous: dict[str, Any], root: Path, r: int, start: str,
                source: str) -> dict[str, Any]:
    """Round ``r`` > 1 of ``run.rounds``: mine's section again with the previous round's trained model as the
    teacher (read with the prompts and max length it was saved with; batch size, dtype and device as the section
    says), the filter section's rule on its candidates, and train's section on what they leave, starting from the
    previous round's model (``start`` "trained") or from ``train.model`` again ("base"). Outputs go under
    <run.dir>/round-<r>/; train's guide, when it is the mining teacher, is this round's teacher."""
    trained = str(trained_model(previous["train"]))
    student = previous["train"].model
    where = round_root(root, r)
    out: dict[str, Any] = {}
    saved = {"max_seq_length": student.max_seq_length, **dict.fromkeys(_PROMPT_KEYS)}  # as the model was saved
    mine = sections["mine"].model_copy(deep=True)
    mine.teacher = validate(TeacherConfig, {**mine.teacher.model_dump(), **saved, "model": trained},
                            f"{source}: round {r}'s teacher")
    out["mine"] = _chain_mine(mine, out, where, source)
    if sections.get("filter") is not None:
        out["filter"] = _chain_filter(sections["filter"], out, where, source)
    train = sections["train"].model_copy(deep=True)
    if start == "trained":
        train.model = validate(ModelConfig, {**student.model_dump(), **saved, "name": trained},
                               f"{source}: round {r}'s train.model")
    out["train"] = _chain_trainer("train")(train, out, where, source)
    return out


# --------------------------------------------------------------------------------------------- the registry


def _mine_outputs(cfg: Any) -> list[Path]:
    return [Path(cfg.output.dir) / "train.parquet", Path(cfg.output.dir) / "stats.json"]


REGISTRY: dict[str, Stage] = {
    s.name: s for s in (
        Stage("mine", MineConfig, "koret.mine:mine", _mine_outputs,
              lambda c: [c.data.train, c.data.corpus, *_source_paths(c.data)], _rows_figure, multi_process=True,
              chain=_chain_mine,
              models=lambda c: [c.teacher.model, c.rescore.model],
              help="Mine hard negatives: teacher embeddings, dense (FAISS/torch) and BM25 search, false-negative filtering."),
        Stage("filter", MineConfig, "koret.filter:refilter", _mine_outputs,
              lambda c: [], _rows_figure, section=FilterConfig, chain=_chain_filter,
              help="Re-filter an existing candidates.parquet with new settings (no model; seconds)."),
        Stage("train", TrainConfig, "koret.train:train",
              lambda c: [trained_model(c) / "modules.json"],
              lambda c: [c.data.train, c.data.eval, c.data.eval_corpus, *_source_paths(c.data)], _train_figure,
              multi_process=True,
              resumable=True, chain=_chain_trainer("train"), models=lambda c: [c.model.name, c.loss.guide],
              help="Train a bi-encoder: MNRL or (cached) GIST, several hard negatives, full or LoRA, data-parallel."),
        Stage("reranker", RerankerConfig, "koret.train_reranker:train_reranker",
              lambda c: [Path(c.args.get("output_dir", "runs/reranker")) / "final" / "config.json"],
              lambda c: [c.data.train, c.data.eval, *_source_paths(c.data)], _train_figure, multi_process=True,
              resumable=True, cli="train-reranker", aliases=("train-reranker",), chain=_chain_trainer("reranker"),
              models=lambda c: [c.model.name],
              help="Fine-tune a cross-encoder reranker on mined hard negatives (mnrl, bce, lambda, listnet, "
                   "margin_mse)."),
        Stage("eval", EvalConfig, "koret.evaluate:evaluate", lambda c: [Path(c.output.dir) / "metrics.json"],
              lambda c: [x for d in [c.data, *c.sets] for x in (d.path, d.corpus)], _eval_figure, chain=_chain_eval,
              models=lambda c: [m.name for m in c.models] + [r.name for r in c.rerankers],
              help="Evaluate models side by side with trec_eval's metrics."),
        Stage("push", PushConfig, "koret.push:push_stage", lambda c: [], lambda c: [], _push_figure,
              chain=_chain_push, models=lambda c: [c.model],
              help="Upload a trained model to the Hugging Face Hub with an honest model card."),
    )
}


def get(name: str) -> Stage:
    from koret.errors import KoretError

    for stage in REGISTRY.values():
        if name == stage.name or name in stage.aliases:
            return stage
    raise KoretError(f"unknown stage {name!r}", f"one of {', '.join(REGISTRY)}")
