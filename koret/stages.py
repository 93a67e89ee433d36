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

from koret.config import (
    EvalConfig,
    FilterConfig,
    MineConfig,
    PushConfig,
    RerankerConfig,
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
    """NDCG@10 of the first model -> the last retriever, and of each reranker over the retriever it reorders (a
    suite of sets: of their macro average, the top-level models of its metrics.json)."""
    models = res["models"]
    # NDCG@10, or at the largest k the corpus allowed (k is clamped to the corpus size)
    key = "ndcg@10" if "ndcg@10" in models[0]["metrics"] else f"ndcg@{max(res['k'])}"
    label = key.upper()
    retrievers = [m for m in models if "reranks" not in m]
    a, b = retrievers[0]["metrics"][key], retrievers[-1]["metrics"][key]
    figure = f"{label} {a:.4f} -> {b:.4f} ({b - a:+.4f})" if len(retrievers) > 1 else f"{label} {a:.4f}"
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


def _upstream_train_parquet(out: dict[str, Any], root: Path, what: str, source: str) -> str:
    """The hardest negatives at hand: the re-filtered train.parquet, else mine's."""
    upstream = "filter" if "filter" in out else "mine" if "mine" in out else None
    if upstream is None:
        raise KoretError(f"{source}: {what}.data.train is required when there is no mine section")
    return str(root / upstream / "train.parquet")


def _chain_mine(section: MineConfig, out: dict[str, Any], root: Path, source: str) -> MineConfig:
    mine = section.model_copy(deep=True)
    mine.output.dir = str(root / "mine")
    return mine


def _chain_filter(section: FilterConfig, out: dict[str, Any], root: Path, source: str) -> MineConfig:
    if "mine" not in out:
        raise KoretError(f"{source}: the filter stage needs a mine section (it re-filters mine's candidates)")
    refilter_cfg = out["mine"].model_copy(deep=True)
    refilter_cfg.filter = section.model_copy(deep=True)
    refilter_cfg.filter.candidates = str(root / "mine")
    refilter_cfg.output.dir = str(root / "filter")
    return validate(MineConfig, refilter_cfg.model_dump(mode="json"), f"{source}: filter")


def _chain_trainer(name: str) -> Callable[[Any, dict[str, Any], Path, str], Any]:
    """train and reranker: data.train defaults to the hardest negatives upstream, outputs go to <run.dir>/<name>."""

    def chain(section: Any, out: dict[str, Any], root: Path, source: str) -> Any:
        cfg = section.model_copy(deep=True)
        if not cfg.data.train:
            cfg.data.train = _upstream_train_parquet(out, root, name, source)
        cfg.args = {**cfg.args, "output_dir": str(root / name)}
        return cfg

    return chain


def _trained_label(ev: EvalConfig, root: Path) -> str:
    """The label (as ``koret eval`` names it, labelled or not) of the retriever the run's reranker reorders: the
    model at ``<run.dir>/train/final`` when ``eval.models`` lists it, else the last model (base first, trained
    last)."""
    from koret.evaluate import model_labels

    labels = model_labels(ev.models)
    trained = (root / "train" / "final").expanduser().resolve()
    for m, label in zip(ev.models, labels, strict=True):
        if Path(m.name).expanduser().resolve() == trained:
            return label
    return labels[-1]


def _chain_eval(section: EvalConfig, out: dict[str, Any], root: Path, source: str) -> EvalConfig:
    ev = section.model_copy(deep=True)
    if not ev.models:
        if "train" not in out:
            raise KoretError(f"{source}: eval.models is required when there is no train section")
        t = out["train"]
        # the base model is read with the prompts training used; the trained one was saved with exactly those
        prompts = {k: getattr(t.model, k) for k in ("query_prompt", "query_prompt_name", "passage_prompt",
                                                     "passage_prompt_name")}
        ev = validate(EvalConfig, {**ev.model_dump(mode="json"), "models": [
            {"name": t.model.name, "label": "base", "max_seq_length": t.model.max_seq_length, **prompts},
            {"name": str(root / "train" / "final"), "label": "trained",
             "max_seq_length": t.model.max_seq_length}]}, f"{source}: eval")
    if "reranker" in out and not ev.rerankers:  # the trained retriever's top-k, reordered by the reranker
        ev = validate(EvalConfig, {**ev.model_dump(mode="json"), "rerankers": [
            {"name": str(root / "reranker" / "final"), "label": "reranker",
             "max_length": out["reranker"].model.max_length}],
            "rerank_model": ev.rerank_model or _trained_label(ev, root)}, f"{source}: eval")
    ev.output.dir = str(root / "eval")
    return ev


def _chain_push(section: PushConfig, out: dict[str, Any], root: Path, source: str) -> PushConfig:
    push = section.model_copy(deep=True)
    push.dry_run_dir = str(root / "push")
    if "train" in out:
        push.model = str(root / "train" / "final")
        push.train_dir = str(root / "train")
    if "eval" in out:
        push.eval_dir = str(root / "eval")
    if "filter" in out or "mine" in out:
        push.mine_dir = str(root / ("filter" if "filter" in out else "mine"))
    return push


# --------------------------------------------------------------------------------------------- the registry


def _mine_outputs(cfg: Any) -> list[Path]:
    return [Path(cfg.output.dir) / "train.parquet", Path(cfg.output.dir) / "stats.json"]


REGISTRY: dict[str, Stage] = {
    s.name: s for s in (
        Stage("mine", MineConfig, "koret.mine:mine", _mine_outputs,
              lambda c: [c.data.train, c.data.corpus], _rows_figure, multi_process=True, chain=_chain_mine,
              models=lambda c: [c.teacher.model, c.rescore.model],
              help="Mine hard negatives: teacher embeddings, FAISS/torch search, positive-aware filtering."),
        Stage("filter", MineConfig, "koret.filter:refilter", _mine_outputs,
              lambda c: [], _rows_figure, section=FilterConfig, chain=_chain_filter,
              help="Re-filter an existing candidates.parquet with new settings (no model; seconds)."),
        Stage("train", TrainConfig, "koret.train:train",
              lambda c: [Path(c.args["output_dir"]) / "final" / "modules.json"],
              lambda c: [c.data.train, c.data.eval, c.data.eval_corpus], _train_figure, multi_process=True,
              resumable=True, chain=_chain_trainer("train"), models=lambda c: [c.model.name, c.loss.guide],
              help="Train with GIST / cached GIST (guide model, several hard negatives), data-parallel."),
        Stage("reranker", RerankerConfig, "koret.train_reranker:train_reranker",
              lambda c: [Path(c.args.get("output_dir", "runs/reranker")) / "final" / "config.json"],
              lambda c: [c.data.train, c.data.eval], _train_figure, multi_process=True,
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
