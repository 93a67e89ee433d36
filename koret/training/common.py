"""What every koret training recipe needs, whatever the model kind: trainer arguments from koret's defaults and
the user's ``args``, the progress callback (a live bar, or plain log lines off a terminal), batches that reach
every process, resume, the final save on every process, token counting, peak memory, ``metrics.json`` and the
loss plot. The recipes (:mod:`koret.train` for bi-encoders) add their data, model and loss, the way
sentence-transformers' CrossEncoderTrainer reuses SentenceTransformerTrainer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from koret import dist
from koret.config import DEFAULT_TRAIN_BATCH, dump_yaml, unknown_training_args
from koret.errors import KoretError
from koret.io import atomic_path, write_json, write_text
from koret.report import info, warn

DEFAULT_ARGS: dict[str, Any] = {
    "output_dir": "runs/train",
    "num_train_epochs": 1,
    "per_device_train_batch_size": DEFAULT_TRAIN_BATCH,
    "learning_rate": 2e-5,
    "batch_sampler": "no_duplicates",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
}


# --------------------------------------------------------------------------------------------- arguments


_NEGATIVE = re.compile(r"^negative(?:_(\d+))?$")


def negative_columns(columns: Any) -> list[str]:
    """The hard-negative columns of a mined table (``negative`` or ``negative_1`` .. ``negative_N``), in rank
    order (``negative_10`` after ``negative_9``), for both trainers."""
    found = [str(c) for c in columns if _NEGATIVE.match(str(c))]
    return sorted(found, key=lambda c: int(_NEGATIVE.match(c).group(1) or 0))  # type: ignore[union-attr]


def training_arguments(args_class: type, user_args: dict[str, Any], has_eval: bool,
                       extra: dict[str, Any] | None = None) -> Any:
    """``args_class`` (e.g. SentenceTransformerTrainingArguments) from koret's defaults, ``user_args`` (unknown
    keys are errors with a suggestion) and recipe-specific ``extra`` settings."""
    import torch
    import transformers

    try:
        unknown_training_args(user_args, args_class.__name__)  # also checked when the config is validated
    except ValueError as exc:
        raise KoretError(str(exc)) from None
    # 10% warmup: a float warmup_steps on Transformers v5+, warmup_ratio before (deprecated there)
    warmup = {"warmup_steps": 0.1} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": 0.1}
    if "warmup_steps" in user_args or "warmup_ratio" in user_args:
        warmup = {}
    merged = {**DEFAULT_ARGS, **warmup, **user_args, **(extra or {})}
    merged.pop("resume_from_checkpoint", None)
    names = {f.name for f in dataclasses.fields(args_class)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in merged and new in names and new not in merged:  # transformers 5's name (the old one warns)
            merged[new] = merged.pop(old)
    for key in ("save_strategy", "eval_strategy", "logging_strategy"):
        if merged.get(key) is False:  # YAML reads a bare `no` as false
            merged[key] = "no"
    if has_eval:
        merged.setdefault("eval_strategy", "steps")
        merged.setdefault("eval_steps", merged.get("save_steps", 500))
    if dist.world_size() > 1:
        # what transformers sets (with a warning on every process) under DDP; VariableSizeBatches keeps the
        # sampler's short batches anyway
        merged.setdefault("dataloader_drop_last", True)
    if not torch.cuda.is_available():
        merged["use_cpu"] = True
        if dist.world_size() > 1:
            merged.setdefault("ddp_backend", "gloo")
    merged.update(default_precision(merged, torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    merged["disable_tqdm"] = True  # koret shows its own progress
    try:
        return args_class(**merged)
    except (TypeError, ValueError) as exc:
        raise KoretError(f"args: {str(exc).splitlines()[0]}") from exc


def default_precision(args: dict[str, Any], bf16_gpu: bool) -> dict[str, Any]:
    """bf16 mixed precision by default on a GPU that supports it (``args.bf16`` / ``args.fp16`` set by the user
    win; on CPU nothing changes). Pure."""
    if not bf16_gpu or args.get("use_cpu") or "bf16" in args or "fp16" in args:
        return {}
    return {"bf16": True}


# --------------------------------------------------------------------------------------------- callback


def _fault_after_steps() -> int | None:
    """Testing hook: ``KORET_FAULT_AFTER_STEPS=N`` kills the process (SIGKILL) after optimizer step N."""
    raw = os.environ.get("KORET_FAULT_AFTER_STEPS")
    return int(raw) if raw else None


def callback_class() -> type:
    from transformers import TrainerCallback

    class KoretCallback(TrainerCallback):
        """Rich progress (steps, loss, rate, ETA) and the loss/eval history for metrics.json."""

        def __init__(self) -> None:
            self.logs: list[dict[str, Any]] = []
            self.evals: list[dict[str, Any]] = []
            self.bar: Any = None
            self.task: Any = None
            self.fault = _fault_after_steps()
            # several sources (koret.training.sources): each source's batch losses since the last log
            self.source_losses: dict[str, list[float]] = {}
            self.source_batches: dict[str, int] = {}

        def add_source_loss(self, name: str, loss: float) -> None:
            self.source_losses.setdefault(name, []).append(loss)
            self.source_batches[name] = self.source_batches.get(name, 0) + 1

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            from koret.report import is_quiet, progress

            if state.is_world_process_zero and not is_quiet():
                self._ctx = progress()
                self.bar = self._ctx.__enter__()
                self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                              unit="steps")

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)
            if self.fault is not None and state.global_step >= self.fault:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = dict(logs or {})
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            if "loss" in logs and self.source_losses:  # the sources of the steps this log covers
                entry["loss_by_source"] = {k: sum(v) / len(v) for k, v in self.source_losses.items()}
                entry["batches_by_source"] = {k: len(v) for k, v in self.source_losses.items()}
                self.source_losses = {}
            if "loss" in logs:
                self.logs.append(entry)
                if self.bar is not None and hasattr(self.bar, "log"):  # plain lines off a terminal
                    self.bar.log(self.task, f"loss {logs['loss']:.4f}")
                elif self.bar is not None:
                    self.bar.update(self.task, description=f"train loss {logs['loss']:.4f}")
            elif any(k.startswith("eval_") for k in logs):
                self.evals.append(entry)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self._ctx.__exit__(None, None, None)
                self.bar = None

    return KoretCallback


# --------------------------------------------------------------------------------------------- the run


class VariableSizeBatches:
    """The trainer's batch sampler as several processes should see it.

    With more than one process, transformers turns on ``dataloader_drop_last`` and accelerate's
    ``BatchSamplerShard`` hands out a round of batches only when the round's last batch is full. But
    ``batch_sampler: no_duplicates`` yields short batches wherever texts repeat across rows (hard negatives
    shared by many queries): with drop_last it yields almost nothing, and an epoch silently ended after a step or
    two. This wrapper keeps the short batches (``drop_last`` off), tells accelerate their size varies
    (``batch_size = None``: every process gets its batch of every round), cuts the batches of a round to the
    same size, and yields the same number of batches, a multiple of the process count, so that no process waits
    for another at the end. Every process builds the same seeded sampler, so each knows every round.
    """

    def __init__(self, inner: Any, num_processes: int) -> None:
        self.inner = inner
        self.num_processes = num_processes
        self.batch_size = None
        self.drop_last = False

    def __len__(self) -> int:
        return max(self.num_processes, len(self.inner) // self.num_processes * self.num_processes)

    def __iter__(self) -> Any:
        """Rounds of ``num_processes`` batches, each batch cut to the round's shortest, so every process's batch
        has the same size (losses that gather embeddings across processes need equal shapes)."""
        count, total = 0, len(self)
        while count < total:
            yielded = False
            round_: list[list[int]] = []
            for batch in self.inner:
                yielded = yielded or bool(batch)
                round_.append(list(batch))
                if len(round_) < self.num_processes:
                    continue
                size = min(len(b) for b in round_)
                for b in round_:
                    yield b[:size]
                round_ = []
                count += self.num_processes
                if count >= total:
                    return
            if not yielded:
                return

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


def _shard_short_batches(trainer: Any) -> None:
    make = trainer.get_batch_sampler

    def get_batch_sampler(*args: Any, **kwargs: Any) -> Any:
        kwargs["drop_last"] = False
        sampler = make(*args, **kwargs)
        return VariableSizeBatches(sampler, dist.world_size()) if sampler is not None else None

    trainer.get_batch_sampler = get_batch_sampler


def resume_checkpoint(setting: Any, resume: bool, out_dir: Path) -> str | None:
    """The checkpoint to resume from: ``args.resume_from_checkpoint: PATH`` as given (it must exist), or with
    ``--resume`` / ``resume_from_checkpoint: true`` the last checkpoint in the output folder."""
    if isinstance(setting, str) and setting.lower() not in ("true", "false", ""):
        if not Path(setting).is_dir():
            raise KoretError(f"args.resume_from_checkpoint: {setting} is not a checkpoint folder",
                             "give a checkpoint-N folder, or true for the last one in args.output_dir")
        info(f"resuming from {setting}")
        return setting
    if not (resume or setting is True or (isinstance(setting, str) and setting.lower() == "true")):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out_dir)) if out_dir.exists() else None
    if last:
        info(f"resuming from {last}")
        return last
    warn(f"--resume: no checkpoint in {out_dir}; starting from the beginning")
    return None


def prepare(trainer: Any) -> None:
    """koret's progress replaces the library's; several processes get batches that reach each of them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    if dist.world_size() > 1:
        _shard_short_batches(trainer)


def save_final(trainer: Any, out_dir: Path, cfg: Any, finish: Any = None) -> Path | None:
    """``final/`` (with the resolved config as ``koret.yaml``), written atomically. Every process takes part in
    the trainer's save (FSDP / DeepSpeed ZeRO-3 gather the weights there); only the main one writes, and runs
    ``finish(folder)`` on what the trainer saved before it becomes ``final/`` (a LoRA run's merged weights,
    :func:`koret.training.lora.finish_final`). Returns the folder on the main process, None on the others."""
    final = out_dir / "final"
    tmp = out_dir / ".final.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    trainer.save_model(str(tmp))
    dist.barrier()
    if not trainer.is_world_process_zero():
        return None
    if finish is not None:
        finish(tmp)
    for folder in (tmp, tmp / "adapter"):
        if folder.is_dir():
            write_text(folder / "koret.yaml", dump_yaml(cfg))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def run_metrics(output: Any, args: Any, callback: Any, tokens_per_row: float | None, wall: float, device: str,
                resumed_from: str | None) -> dict[str, Any]:
    """The figures every recipe reports in ``metrics.json``."""
    m = output.metrics
    world = args.world_size
    samples_per_s = m.get("train_samples_per_second")
    return {
        "world_size": world, "per_device_batch_size": args.per_device_train_batch_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "steps": output.global_step, "final_loss": callback.logs[-1]["loss"] if callback.logs else m.get("train_loss"),
        "train_loss": m.get("train_loss"), "train_runtime": m.get("train_runtime"),
        "samples_per_second": samples_per_s, "steps_per_second": m.get("train_steps_per_second"),
        "tokens_per_second": samples_per_s * tokens_per_row if samples_per_s and tokens_per_row else None,
        "tokens_per_row": tokens_per_row, "wall_seconds": wall, "resumed_from": resumed_from, "device": device,
        "loss_curve": callback.logs, "eval": callback.evals, **peak_memory(),
    }


def model_record(model: Any, args: Any, adapter: dict[str, Any] | None) -> dict[str, Any]:
    """What metrics.json records of the trained model's memory levers: the LoRA adapter (None: full
    fine-tuning), gradient checkpointing, the attention kernel and the weights' dtype."""
    first = model[0]
    config = getattr(getattr(first, "model", None), "config", None)
    weights = next(iter(model.parameters()), None)
    return {"lora": adapter, "gradient_checkpointing": bool(args.gradient_checkpointing),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "weights_dtype": str(weights.dtype).rsplit(".", 1)[-1] if weights is not None else None}


def write_records(out_dir: Path, metrics: dict[str, Any], cfg: Any, callback: Any) -> None:
    """``metrics.json``, ``config.yaml`` and ``training.png``."""
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "config.yaml", dump_yaml(cfg))
    plot_training(out_dir / "training.png", callback.logs, callback.evals)


def count_tokens(model: Any, dataset: Any, sample: int = 4000) -> float:
    """Tokens per training row (prompts included, truncated at max_seq_length), estimated on a sample (several
    sources, a DatasetDict: each source's estimate, weighted by its rows)."""
    if isinstance(dataset, dict):
        total_rows = sum(len(d) for d in dataset.values())
        return sum(count_tokens(model, d, sample) * len(d) for d in dataset.values()) / max(total_rows, 1)
    rows = dataset.select(range(min(sample, len(dataset))))
    tok = model.tokenizer
    total = 0
    for col in rows.column_names:
        if not isinstance(rows[0][col], str):
            continue  # labels (teacher scores)
        enc = tok(list(rows[col]), truncation=True, max_length=model.max_seq_length)
        total += sum(len(ids) for ids in enc["input_ids"])
    return total / max(len(rows), 1)


def peak_memory() -> dict[str, Any]:
    import torch

    from koret.report import peak_rss_bytes

    out: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def plot_training(path: Path, logs: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if logs:
        ax.plot([e["step"] for e in logs], [e["loss"] for e in logs], color="#264653", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    keys = sorted({k for e in evals for k in e if k.endswith("ndcg@10") or k == "eval_loss"})
    if keys:
        ax2 = ax.twinx()
        for key, color in zip(keys, ["#e76f51", "#2a9d8f", "#e9c46a"], strict=False):
            pts = [(e["step"], e[key]) for e in evals if key in e]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=key)
        ax2.set_ylabel("eval")
        ax2.legend(loc="upper right")
    if logs:
        ax.legend(loc="upper left")
    ax.set_title("koret train")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
