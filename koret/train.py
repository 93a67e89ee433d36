"""``koret train``: multi-negative GIST training with a guide model, on one or many processes (the recipe).

Every ``negative_*`` column of the mined ``train.parquet`` is used (several hard negatives per anchor), with
sentence-transformers' own trainer and losses (:mod:`koret.training.biencoder`); ``args`` is any field of
SentenceTransformerTrainingArguments. Under ``accelerate launch`` / torchrun / ``--num-processes N`` the trainer
does data parallelism; ``loss.gather_across_devices`` makes in-batch negatives span every rank. Only the main
process writes outputs. The plumbing any model kind needs is :mod:`koret.training.common`.

Phases: data -> student and prompts -> guide -> arguments, loss and trainer -> train -> save -> records.

Outputs in ``args.output_dir``: ``final/`` (the model, with its training prompts and model-card data),
``checkpoint-*``, ``metrics.json``, ``training.png``, ``config.yaml``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from koret import dist
from koret.config import TrainConfig
from koret.encode import resolve_model_path
from koret.prompts import resolve_prompts, saved_prompts
from koret.report import info, show, table, warn
from koret.training import lora
from koret.training.attention import restore_own_dropout, save_with_own_dropout
from koret.training.biencoder import (
    GIST_LOSSES,
    LABEL,
    GuideCollator,
    build_loss,
    build_source_losses,
    guide_module_class,
    ir_evaluator,
    load_student,
    load_train_data,
    resolve_guide,
    source_prompts,
    split_by_anchor,
)
from koret.training.common import (
    callback_class,
    count_tokens,
    model_record,
    prepare,
    resume_checkpoint,
    run_metrics,
    save_final,
    training_arguments,
    write_records,
)
from koret.training.sources import (
    column_prompts,
    num_rows,
    resume_source_batches,
    saved_source_prompts,
    use_sources,
)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run ``koret train``; returns the metrics (also written to ``metrics.json``) on the main process, {} on the
    others."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    started = time.perf_counter()
    lora.preflight(cfg.model)  # model.lora and quantized bases: checked on the model's config, before any load
    # data
    data = load_train_data(cfg)
    info(f"{data.source}: {data.rows:,} rows, {data.num_negatives} negatives per row", lead="data")
    if cfg.loss.guide not in (None, "teacher", "student"):
        resolve_model_path(cfg.loss.guide, "loss.guide")
    dataset, eval_dataset = data.dataset, None
    if cfg.data.holdout > 0:
        dataset, eval_dataset = split_by_anchor(dataset, cfg.data.holdout, int(cfg.args.get("seed", 42)))
        for s in data.sources or []:  # each source's rows trained on: the held-out anchors are not
            s.rows = len(dataset[s.name])

    # student and its prompts
    student = load_student(cfg)
    body_config = student[0].model.config  # its transformers config (the same object once LoRA wraps the model)
    q_prompt, p_prompt = resolve_prompts(student.prompts, cfg.model, "model")

    # guide: the mining teacher, reading its own tokens with the teacher's prompts, max length and dtype
    guide = resolve_guide(cfg, data, student, (q_prompt, p_prompt)) if cfg.loss.name in GIST_LOSSES else None
    guide_desc = guide.description if guide else "none"
    if guide is None and cfg.loss.guide is not None:
        warn(f"loss.guide is ignored by loss {cfg.loss.name!r}")
    # the adapter goes on after the guide: a 'student' guide is a frozen copy of the base
    adapter = lora.wrap(student, cfg.model.lora) if cfg.model.lora else None

    # arguments, loss, trainer
    evaluator = ir_evaluator(cfg, q_prompt, p_prompt, int(cfg.args.get("per_device_eval_batch_size", 32))) \
        if cfg.data.eval else None
    per_source = source_prompts(student.prompts, data, (q_prompt, p_prompt))  # several sources: their own
    prompts = column_prompts(dataset, (q_prompt, p_prompt), per_source, exclude=(LABEL,))
    args = training_arguments(SentenceTransformerTrainingArguments, cfg.args,
                              has_eval=evaluator is not None or eval_dataset is not None,
                              extra={"prompts": prompts} if prompts else None)
    out_dir = Path(args.output_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    # the model is saved with exactly the prompts it was trained with (sentence-transformers stores model.prompts)
    student.prompts = {**saved_prompts(q_prompt, p_prompt), **saved_source_prompts(per_source, (q_prompt, p_prompt))}
    student.default_prompt_name = None
    card = student.model_card_data
    card.language = ["ko"]
    card.tags = sorted(set((card.tags or []) + ["koret", "korean", "retrieval"]))
    guide_module = guide_module_class()(guide.model, student) if guide else None
    # several sources: a loss per source name, so the trainer tags each batch with its source
    loss = build_source_losses(cfg, student, guide_module, data) if data.sources else \
        build_loss(cfg, student, guide_module)
    callback = callback_class()()
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                                         loss=loss, evaluator=evaluator, callbacks=[callback])
    if guide is not None:
        trainer.data_collator = GuideCollator(trainer.data_collator, guide)
    prepare(trainer)
    save_with_own_dropout(trainer, body_config, student.koret_own_dropout)  # checkpoints: the model's own
    if data.sources:  # every batch from one source, drawn as data.sampler says; each source's loss logged
        use_sources(trainer, [s.weight for s in data.sources], cfg.data.sampler, callback)
    if adapter is not None:
        lora.resume_adapter(trainer, student)

    # train
    resume_from = resume_checkpoint(cfg.args.get("resume_from_checkpoint"), resume, out_dir)
    tokens_per_row = count_tokens(student, dataset)
    if data.sources:  # a resumed run counts each source's batches on from its checkpoint
        resume_source_batches(callback, resume_from)
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started

    # save (every process takes part) and records (the main one)
    trained_dropout = restore_own_dropout(body_config, student.koret_own_dropout)  # final/: the model's own
    final = save_final(trainer, out_dir, cfg, finish=partial(lora.finish_final, student, settings=cfg.model.lora)
                       if adapter is not None else None)
    if final is None:
        return {}
    metrics = {"loss": cfg.loss.name, "guide": guide_desc, **model_record(student, args, adapter),
               "attention_dropout": trained_dropout,  # trained with (a step's memory hangs on it on CPU)
               "distill": _distill_record(cfg, data),
               "num_negatives": data.num_negatives,
               "train_rows": num_rows(dataset), "base_model": cfg.model.name, "data": data.source,
               **({"sampler": cfg.data.sampler,
                   # batches of all processes: every process trains on the same source at each draw
                   "sources": [s.record(per_source[s.name], callback.source_batches.get(s.name, 0) * args.world_size)
                               for s in data.sources]} if data.sources else {}),
               **run_metrics(output, args, callback, tokens_per_row, wall, str(student.device), resume_from)}
    write_records(out_dir, metrics, cfg, callback)
    distill = f" + {cfg.loss.distill.weight:g} x {cfg.loss.distill.name}" if cfg.loss.distill else ""
    rows = [["loss", f"{cfg.loss.name}{distill} (guide: {guide_desc})"],
            *lora.table_rows(cfg.model.lora, adapter),
            ["rows x negatives", f"{num_rows(dataset):,} x {data.num_negatives}"],
            *[[f"source {s['name']}: rows / batches trained", f"{s['rows']:,} / {s['batches']:,}"]
              for s in metrics.get("sources", [])],
            ["world size / global batch", f"{metrics['world_size']} / {metrics['global_batch_size']}"],
            ["steps", metrics["steps"]], ["final loss", metrics["final_loss"]],
            ["samples/s", metrics["samples_per_second"] or float("nan")],
            ["tokens/s", metrics["tokens_per_second"] or float("nan")]]
    for e in callback.evals[-1:]:
        rows += [[k.replace("eval_", "", 1), v] for k, v in e.items() if "ndcg@10" in k or "mrr@10" in k]
    rows += [["wall seconds", wall], ["model", str(final)]]
    show(table(f"koret train: {out_dir}", ["", "value"], rows))
    return metrics


def _distill_record(cfg: TrainConfig, data: Any) -> dict[str, Any] | None:
    """loss.distill as configured, with what it resolved to: the kind of teacher scores read and both
    temperatures (the defaults depend on the kind, so the config alone does not say)."""
    if cfg.loss.distill is None:
        return None
    from koret.training.biencoder import loss_temperature
    from koret.training.distill import score_kind_of, teacher_scale

    train = data.sources[0].train if data.sources else cfg.data.train  # several: the first source's (each has its own)
    scale = teacher_scale(cfg.loss.distill, score_kind_of(train), loss_temperature(cfg.loss), train)
    return {**cfg.loss.distill.model_dump(), "score_kind": scale.kind,
            "resolved_temperature": scale.student_temperature,
            "resolved_teacher_temperature": scale.teacher_temperature}
