"""LoRA for ``koret train`` and ``koret train-reranker`` (``model.lora``), through peft.

The adapter goes on the transformers model inside the SentenceTransformer / CrossEncoder (peft's
``get_peft_model``): every base weight is frozen, only the adapter's low-rank matrices train (and a reranker's
new score head, which peft keeps in full as a module to save). ``target_modules: null`` is peft's
``all-linear``: every linear layer of the transformer blocks, whatever the architecture calls them.

What the checks catch before any model loads (:func:`preflight`): peft missing, a target module name the model
does not have (read from its config on the meta device, without weights), a target that is not a layer LoRA
adapts, ``lora.merge`` on a quantized base, a quantized base without LoRA, a student that is itself an adapter.

Saving: checkpoints hold the adapter only (peft's ``adapter_config.json`` + ``adapter_model.safetensors`` beside
the tokenizer and the sentence-transformers modules), which ``--resume`` loads back (:func:`resume_adapter`).
``final/`` (:func:`finish_final`): with ``lora.merge`` the merged weights (they load without peft) and the
adapter in ``final/adapter``; without, the adapter. :func:`koret.encode.load_adapter_folder` loads an adapter
folder wherever koret reads a model.

Reference: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from koret.encode import adapter_base, require_peft, resolve_dtype, transformer_path
from koret.errors import KoretError

ALL_LINEAR = "all-linear"
_ADAPTED = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")  # layer classes peft's LoRA wraps


def base_dtype(setting: str, lora: bool, device: str) -> str:
    """The student's weights dtype (``model.dtype``): ``auto`` is bfloat16 for the frozen base of a LoRA run on a
    GPU that supports it (peft keeps the adapter in float32), else float32: full fine-tuning keeps float32
    master weights (``args.bf16`` runs the steps in bfloat16)."""
    if setting != "auto":
        return setting
    return resolve_dtype("auto", device) if lora else "float32"


def describe(settings: Any) -> str:
    """``r 16, alpha 32, dropout 0.05, all-linear``: the adapter in words (tables, the model card)."""
    targets = ", ".join(settings.target_modules) if settings.target_modules else ALL_LINEAR
    return f"r {settings.r}, alpha {settings.alpha:g}, dropout {settings.dropout:g}, {targets}"


def table_rows(settings: Any, adapter: dict[str, Any] | None) -> list[list[str]]:
    """The run table's LoRA row (none for full fine-tuning)."""
    if adapter is None:
        return []
    return [["LoRA (trainable / all parameters)", f"{describe(settings)} ({adapter['trainable_parameters']:,} / "
                                                  f"{adapter['total_parameters']:,})"]]


# --------------------------------------------------------------------------------------------- before loading


def _config_of(ref: str) -> Any | None:
    """The transformers config of a model folder / Hub id (a SentenceTransformer's transformers module), or None
    when it cannot be read without loading more (the load then reports what is wrong)."""
    from transformers import AutoConfig

    path = Path(ref)
    if path.is_dir():
        ref = str(path / transformer_path(path))
    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError, KeyError):
        return None


def _first_module_type(ref: str) -> str | None:
    modules = Path(ref) / "modules.json"
    if not modules.exists():
        return None
    entries = json.loads(modules.read_text())
    return str(entries[0].get("type", "")) if entries else None


def matches(name: str, target: str) -> bool:
    """peft's rule for one entry of a target_modules list: the module's full name, or its last dotted parts."""
    return name == target or name.endswith(f".{target}")


def check_targets(named_types: dict[str, str], targets: list[str], key: str) -> None:
    """Every target must name a layer of the model (``named_types``: module name -> class name) that LoRA
    adapts: a one-line error names the first that does not, with the linear layers the model has. Pure."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, t in named_types.items() if t in ("Linear", "Conv1D")})
    for target in targets:
        hits = [n for n in named_types if matches(n, target)]
        if not hits:
            raise KoretError(f"{key}.target_modules: {target!r} is not a module of this model",
                             f"its linear layers: {', '.join(linear) or 'none'}; or null for all of them")
        wrong = sorted({named_types[n] for n in hits if named_types[n] not in _ADAPTED})
        if wrong:
            raise KoretError(f"{key}.target_modules: {target!r} names {', '.join(wrong)} layers, which LoRA does "
                             "not adapt", f"name linear layers: {', '.join(linear) or 'none'}")


def _meta_modules(config: Any) -> dict[str, str] | None:
    """Module name -> class name of the model ``config`` describes, built on the meta device (no weights, no
    memory); None when the architecture cannot be built from its config alone (custom code)."""
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception:
        return None
    return {n: type(m).__name__ for n, m in model.named_modules() if n}


def preflight(model_cfg: Any, key: str = "model") -> None:
    """The checks that need only the model's config, run before any model loads (see the module doc)."""
    if not model_cfg.name:
        return
    from koret.encode import resolve_model_path

    ref = resolve_model_path(model_cfg.name, f"{key}.name")
    settings = model_cfg.lora
    if adapter_base(ref) is not None:
        raise KoretError(f"{key}.name: {model_cfg.name} is a LoRA adapter folder, not a model to train",
                         "train from its base, or from the merged weights (final/ of a run with lora.merge: true)")
    config = _config_of(ref)
    quantized = config is not None and getattr(config, "quantization_config", None) is not None
    if settings is None:
        if quantized:
            raise KoretError(f"{key}.name: {model_cfg.name} is quantized; its weights cannot be fine-tuned in full",
                             f"set {key}.lora (an adapter trains on the quantized base)")
        return
    require_peft(f"{key}.lora")
    if quantized and settings.merge:
        raise KoretError(f"{key}.lora.merge: {model_cfg.name} is quantized, and merging the adapter into quantized "
                         "weights rounds it away", f"set {key}.lora.merge false: final/ is then the adapter")
    kind = _first_module_type(ref)
    if kind is not None and not kind.endswith(".Transformer"):
        raise KoretError(f"{key}.lora: {model_cfg.name}'s first module is {kind.rsplit('.', 1)[-1]}, not a "
                         "transformers model, and peft cannot wrap it", f"remove {key}.lora to train it in full")
    if settings.target_modules and config is not None:
        named = _meta_modules(config)
        if named is not None:
            check_targets(named, settings.target_modules, f"{key}.lora")


# --------------------------------------------------------------------------------------------- wrapping


def _transformers_module(model: Any, key: str) -> Any:
    from sentence_transformers.base.modules.transformer import Transformer

    word = model[0]
    if not isinstance(word, Transformer) or not hasattr(word, "model"):
        raise KoretError(f"{key}.lora: the model's first module is {type(word).__name__}, not a transformers model, "
                         "and peft cannot wrap it", f"remove {key}.lora to train it in full")
    return word


def wrap(model: Any, settings: Any, key: str = "model") -> dict[str, Any]:
    """Put a LoRA adapter on ``model``'s transformers model (in place) and freeze everything else; returns what
    metrics.json records (the settings, the targets peft resolved, trainable and total parameters)."""
    peft = require_peft(f"{key}.lora")
    word = _transformers_module(model, key)
    task_type = "SEQ_CLS" if getattr(word, "transformer_task", "") == "sequence-classification" else None
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(settings.target_modules) if settings.target_modules else ALL_LINEAR,
                             task_type=task_type)
    base = word.model
    name = getattr(base, "name_or_path", "") or ""
    try:
        wrapped = peft.get_peft_model(base, config)
    except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
        first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
        raise KoretError(f"{key}.lora: peft cannot wrap {type(base).__name__} ({first})",
                         f"check {key}.lora.target_modules, or remove {key}.lora to train in full") from None
    # the base as a loader finds it later: an absolute folder, or the Hub id
    if name and Path(name).expanduser().is_dir():
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(name).expanduser().resolve())
    word.model = wrapped
    for module in list(model)[1:]:  # pooling, dense heads: frozen as the base is
        for p in module.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = wrapped.peft_config["default"].target_modules
    return {**settings.model_dump(), "resolved_targets": sorted(targets) if isinstance(targets, (set, list))
            else targets, "trainable_parameters": trainable, "total_parameters": total}


def adapter_of(model: Any) -> Any:
    return model[0].model


# --------------------------------------------------------------------------------------------- saving


def resume_adapter(trainer: Any, model: Any) -> None:
    """``--resume`` and ``load_best_model_at_end`` read a checkpoint's adapter into the model being trained
    (sentence-transformers would reload the checkpoint folder through transformers' own adapter loading)."""
    from peft import set_peft_model_state_dict

    def load(checkpoint: str, *args: Any, **kwargs: Any) -> None:
        folder = Path(checkpoint)
        files = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
        found = next((f for f in files if f.exists()), None)
        if found is None:
            raise KoretError(f"args.resume_from_checkpoint: {folder} holds no LoRA adapter (adapter_model.*)",
                             "resume from a checkpoint of the same LoRA run")
        if found.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(found))
        else:
            import torch

            state = torch.load(found, map_location="cpu", weights_only=True)
        try:
            result = set_peft_model_state_dict(adapter_of(model), state)
        except RuntimeError as exc:  # another rank: the matrices' shapes differ
            raise KoretError(f"args.resume_from_checkpoint: {folder}'s adapter does not fit this model "
                             f"({str(exc).splitlines()[0][:160]})",
                             "resume with the LoRA settings of the run that wrote it") from None
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise KoretError(f"args.resume_from_checkpoint: {folder}'s adapter does not fit this model "
                             f"(e.g. {unexpected[0]})", "resume with the LoRA settings of the run that wrote it")

    trainer._load_from_checkpoint = load


def finish_final(model: Any, folder: Path, settings: Any) -> None:
    """Turn the adapter folder the trainer saved into ``final/`` (main process only): the transformers config
    goes beside the adapter (a reranker's label count, the pad token); with ``merge``, the adapter moves to
    ``adapter/`` and the folder gets the merged weights, which load without peft."""
    wrapped = adapter_of(model)
    wrapped.get_base_model().config.save_pretrained(str(folder))
    if not settings.merge:
        return
    adapter = folder / "adapter"
    staged = folder.with_name(folder.name + ".adapter")
    shutil.rmtree(staged, ignore_errors=True)
    os.replace(folder, staged)
    folder.mkdir()
    os.replace(staged, adapter)
    model[0].model = wrapped.merge_and_unload()
    model.save(str(folder))
