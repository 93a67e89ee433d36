"""``koret train-reranker``: fine-tune a cross-encoder reranker on mined hard negatives (the recipe).

The reranker reads (query, passage) together and scores their relevance; it reorders a retriever's top-k. It
trains on what ``koret mine`` already wrote: per query a positive and teacher-scored hard negatives, shaped for
the chosen loss by :mod:`koret.training.crossencoder` (groups of 1 + N with in-batch negatives by default),
through sentence-transformers' own CrossEncoderTrainer, arguments and losses; ``args`` is any field of
CrossEncoderTrainingArguments. The plumbing is the bi-encoder recipe's (:mod:`koret.training.common`):
progress lines off a terminal, several processes, ``--resume``, ``final/`` saved by every process, records.

A reranker's negatives should be harder than a bi-encoder's: mine again with the trained retriever as teacher
(``koret mine`` with ``teacher.model: runs/train/final``), then train the reranker on that ``train.parquet``.

Phases: data -> model -> arguments, loss and trainer -> train -> save -> records.

Outputs in ``args.output_dir``: ``final/`` (the CrossEncoder), ``checkpoint-*``, ``metrics.json``,
``training.png``, ``config.yaml``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from koret import dist
from koret.config import RerankerConfig
from koret.report import info, show, table
from koret.training import lora
from koret.training.attention import restore_own_dropout, save_with_own_dropout
from koret.training.common import (
    callback_class,
    model_record,
    prepare,
    resume_checkpoint,
    run_metrics,
    save_final,
    training_arguments,
    write_records,
)
from koret.training.crossencoder import (
    build_reranker_loss,
    load_reranker,
    load_reranker_data,
    reranking_evaluator,
)
from koret.training.sources import resume_source_batches, use_sources

RERANKER_DEFAULTS: dict[str, Any] = {"output_dir": "runs/reranker", "learning_rate": 2e-5,
                                     "per_device_train_batch_size": 16}


def train_reranker(cfg: RerankerConfig, resume: bool = False) -> dict[str, Any]:
    """Run ``koret train-reranker``; returns the metrics (also in ``metrics.json``) on the main process, {} on the
    others."""
    from sentence_transformers import CrossEncoderTrainer, CrossEncoderTrainingArguments

    started = time.perf_counter()
    lora.preflight(cfg.model)  # model.lora and quantized bases: checked on the model's config, before any load
    # data, shaped for the loss
    data = load_reranker_data(cfg)
    info(f"{data.source}: {data.rows:,} rows for loss {cfg.loss.name}, {data.num_negatives} hard negatives per query",
         lead="data")

    # model, and the held-out reranking it is evaluated on during training
    model = load_reranker(cfg)
    adapter = lora.wrap(model, cfg.model.lora) if cfg.model.lora else None
    evaluator = reranking_evaluator(cfg) if cfg.data.eval else None

    # arguments, loss, trainer
    user_args = {**RERANKER_DEFAULTS, **cfg.args}
    # in-batch negatives must not repeat a text; other losses (pairs, lists) sample plainly
    user_args.setdefault("batch_sampler", "no_duplicates" if cfg.loss.name in ("mnrl", "cached_mnrl")
                         else "batch_sampler")
    args = training_arguments(CrossEncoderTrainingArguments, user_args, has_eval=evaluator is not None)
    out_dir = Path(args.output_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    card = model.model_card_data
    card.language = ["ko"]
    card.tags = sorted(set((card.tags or []) + ["koret", "korean", "reranker"]))
    loss = build_reranker_loss(cfg, model)
    if data.sources:  # a loss per source name (the same one), so the trainer tags each batch with its source
        loss = dict.fromkeys((s.name for s in data.sources), loss)
    callback = callback_class()()
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data.dataset, loss=loss,
                                  evaluator=evaluator, callbacks=[callback])
    prepare(trainer)
    save_with_own_dropout(trainer, model.model.config, model.koret_own_dropout)  # checkpoints: the model's own
    if data.sources:  # every batch from one source, drawn as data.sampler says; each source's loss logged
        use_sources(trainer, [s.weight for s in data.sources], cfg.data.sampler, callback)
    if adapter is not None:
        lora.resume_adapter(trainer, model)

    # train
    resume_from = resume_checkpoint(cfg.args.get("resume_from_checkpoint"), resume, out_dir)
    if data.sources:  # a resumed run counts each source's batches on from its checkpoint
        resume_source_batches(callback, resume_from)
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started

    # save (every process takes part) and records (the main one)
    trained_dropout = restore_own_dropout(model.model.config, model.koret_own_dropout)  # final/: the model's own
    final = save_final(trainer, out_dir, cfg, finish=partial(lora.finish_final, model, settings=cfg.model.lora)
                       if adapter is not None else None)
    if final is None:
        return {}
    metrics = {"kind": "reranker", "loss": cfg.loss.name, "num_negatives": data.num_negatives,
               "train_rows": data.rows, "base_model": cfg.model.name, "data": data.source,
               **({"sampler": cfg.data.sampler,
                   # batches of all processes: every process trains on the same source at each draw
                   "sources": [s.record(batches=callback.source_batches.get(s.name, 0) * args.world_size)
                               for s in data.sources]}
                  if data.sources else {}),
               # what a step's memory hangs on: the pair length cut, the attention kernel and its dropout
               "max_length": model.max_seq_length,
               "attention_dropout": trained_dropout, **model_record(model, args, adapter),
               **run_metrics(output, args, callback, None, wall, str(model.device), resume_from)}  # pairs: no token count
    write_records(out_dir, metrics, cfg, callback)
    show(table(f"koret train-reranker: {out_dir}", ["", "value"], [
        ["loss", cfg.loss.name],
        *lora.table_rows(cfg.model.lora, adapter),
        ["rows x hard negatives", f"{data.rows:,} x {data.num_negatives}"],
        *[[f"source {s['name']}: rows / batches trained", f"{s['rows']:,} / {s['batches']:,}"]
          for s in metrics.get("sources", [])],
        ["world size / global batch", f"{metrics['world_size']} / {metrics['global_batch_size']}"],
        ["steps", metrics["steps"]], ["final loss", metrics["final_loss"]],
        ["samples/s", metrics["samples_per_second"] or float("nan")],
        *[[k.replace("eval_", "", 1), v] for e in callback.evals[-1:] for k, v in e.items() if "ndcg@10" in k],
        ["wall seconds", wall], ["model", str(final)]]))
    return metrics
