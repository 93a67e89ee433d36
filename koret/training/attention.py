"""``model.attention_dropout`` of both trainers (``koret train`` and ``koret train-reranker``): the dropout of the
attention probabilities the model trains with, and the model's own value, which every saved config keeps.

On CPU, ``torch.nn.functional.scaled_dot_product_attention`` runs its fused kernel only without dropout; with
BERT's 0.1 it falls back to the math kernel, which keeps every head's (L x L) scores, probabilities and dropout
mask of every layer for the backward pass. ``auto`` therefore turns the dropout off on CPU and keeps the model's
own on GPUs, whose fused kernels take dropout. The value is a training-time setting, not a property of the
trained model: checkpoints and ``final/`` are saved with the model's own value (a later fine-tuning on a GPU
should not inherit a CPU run's 0), and metrics.json records the value trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the attention-probability dropout keys of transformers configs: BERT family; ModernBERT, decoders (Qwen3, ...)
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def resolve_attention_dropout(setting: float | str | None, on_gpu: bool) -> float | None:
    """``model.attention_dropout`` as a number, or None for the model's own. ``auto``: 0 on CPU (see the module
    docstring; all-MiniLM-L6-v2, 16 (query, passage) pairs of 512 tokens, reranker mnrl: 9.8 GB peak with 0.1,
    2.9 GB with 0), the model's own on GPUs. Pure."""
    if setting == "auto":
        return None if on_gpu else 0.0
    return None if setting is None else float(setting)


def config_dropouts(config: Any) -> dict[str, float]:
    """The attention-probability dropout keys a transformers config sets, with their values."""
    return {key: float(getattr(config, key)) for key in ATTENTION_DROPOUT_KEYS
            if isinstance(getattr(config, key, None), (int, float))}


def model_attention_dropout(config: Any) -> float | None:
    """The attention-probability dropout a transformers config sets (None if it names none)."""
    return next(iter(config_dropouts(config).values()), None)


def own_attention_dropout(ref: str) -> dict[str, float]:
    """The attention-probability dropout keys of a model's transformers config and their values: the config of a
    local SentenceTransformer / CrossEncoder folder's transformers module (``modules.json``), else ``ref``'s own
    ({} when it names none, or when the config cannot be read: the load then reports what is wrong with
    ``ref``)."""
    from transformers import AutoConfig

    from koret.encode import transformer_path

    try:
        sub = transformer_path(Path(ref))
    except (OSError, ValueError, AttributeError, IndexError):  # a broken modules.json: the load says so
        sub = ""
    try:
        config = AutoConfig.from_pretrained(str(Path(ref) / sub) if sub else ref)
    except (OSError, ValueError):
        return {}
    return config_dropouts(config)


def dropout_overrides(setting: float | str | None, ref: str, on_gpu: bool) -> tuple[dict[str, float],
                                                                                    dict[str, float]]:
    """(the config keyword arguments to load the model with, the model's own values they replace): both empty
    when the model keeps its own dropout or its config names none."""
    value = resolve_attention_dropout(setting, on_gpu)
    own = {} if value is None else own_attention_dropout(ref)
    return dict.fromkeys(own, value), own


def save_with_own_dropout(trainer: Any, config: Any, own: dict[str, float]) -> None:
    """Make every save of ``trainer`` (checkpoints, and ``final/`` through :func:`koret.training.common.save_final`)
    write the model's own attention dropout (``own``) into the saved config, and put the training value back
    after it. ``config`` is the transformers config of the model being trained."""
    if not own:
        return
    save = trainer.save_model

    def save_model(*args: Any, **kwargs: Any) -> Any:
        training = {key: getattr(config, key) for key in own}
        restore_own_dropout(config, own)
        try:
            return save(*args, **kwargs)
        finally:
            for key, value in training.items():
                setattr(config, key, value)

    trainer.save_model = save_model


def restore_own_dropout(config: Any, own: dict[str, float]) -> float | None:
    """Put the model's own attention dropout back into ``config`` for good (after training, before ``final/``:
    a LoRA run's final folder also writes the config outside the trainer's save); returns the value trained with
    (for metrics.json)."""
    trained = model_attention_dropout(config)
    for key, value in own.items():
        setattr(config, key, value)
    return trained
