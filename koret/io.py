"""Atomic file writes: every output is written under a temporary name in its folder, then renamed.

A reader (or a rerun after kill -9) therefore sees either the previous complete file or the new complete
file, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_parquet(path: str | Path, table: Any) -> None:
    """Write a pandas DataFrame or a pyarrow Table as parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_record(path: str | Path | None) -> dict[str, Any] | None:
    """A JSON or YAML mapping another stage wrote (``stats.json``, ``config.yaml``), or None if absent/unreadable.

    For optional records (a model card section, a default guide): their absence is not an error.
    """
    if path is None or not Path(path).exists():
        return None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text)
    except Exception:  # JSON/YAML syntax errors, unreadable files: treated as absent
        return None
    return loaded if isinstance(loaded, dict) else None


def fingerprint_paths(paths: list[str], content_limit: int = 64 * 2**20) -> str:
    """A short hash that changes when any of ``paths`` changes: the content of files up to ``content_limit``
    bytes, size and modification time of larger ones, every file of a folder; a name that is not a local path
    (a Hub id) counts as its text. ``file.json#A:B`` selections fingerprint the file."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for raw in paths:
        path = Path(raw)
        if not path.exists() and "#" in raw:
            path = Path(raw.rpartition("#")[0])
        h.update(raw.encode() + b"\x00")
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.exists() else []
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}".encode())
            if st.st_size <= content_limit:
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                        h.update(block)
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()
