"""Process topology for runs under ``accelerate launch`` / torchrun (one process when not launched).

koret only needs rank, world size and a barrier; accelerate's :class:`~accelerate.PartialState` provides them and
picks the backend (NCCL on GPUs, gloo on CPUs). Nothing is initialised for a plain single-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from koret.errors import KoretError

_solo = {"on": False}


def world_size() -> int:
    return 1 if _solo["on"] else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return 0 if _solo["on"] else int(os.environ.get("RANK", "0"))


def launched_rank() -> int:
    """This process's rank in the launched job, even inside :func:`single_process`."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Run a single-process stage on the main process of a launched job: inside, koret's own code sees one
    process (no collectives), while the other processes wait in :class:`FileSync`."""
    previous = _solo["on"]
    _solo["on"] = True
    try:
        yield
    finally:
        _solo["on"] = previous


def is_main() -> bool:
    return rank() == 0


@lru_cache(maxsize=1)
def _state() -> Any:
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate ignores WORLD_SIZE on a machine without GPUs and runs single-process
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=collective_timeout())
    import atexit

    atexit.register(_destroy_process_group)
    return state


def collective_timeout() -> Any:
    """How long a process waits for the others in a collective: ``KORET_COLLECTIVE_TIMEOUT`` seconds, default 6
    hours. torch's defaults (30 minutes for gloo, 10 for NCCL) are shorter than work koret does on the main
    process alone while the others wait (BM25 over a large corpus); a process that dies is caught by the
    launcher, not by this timeout."""
    from datetime import timedelta

    raw = os.environ.get("KORET_COLLECTIVE_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else 6 * 3600.0
    except ValueError:
        raise KoretError(f"KORET_COLLECTIVE_TIMEOUT: {raw!r} is not a number of seconds") from None
    return timedelta(seconds=seconds)


def _destroy_process_group() -> None:
    """Tear the process group down before the interpreter does: gloo's threads otherwise abort the process at
    exit now and then ("terminate called without an active exception", exit -6)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


class PeerLost(KoretError):
    """Another process of the run ended (killed, crashed) while this one waited for it in a collective."""

    exit_code = 1

    def __init__(self, op: str, exc: Exception) -> None:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if "timed out" in first.lower():
            seconds = collective_timeout().total_seconds()
            super().__init__(f"waited {seconds:g} s in {op} for the other processes of this run and gave up "
                             f"({type(exc).__name__}: {first[:160]})",
                             "raise KORET_COLLECTIVE_TIMEOUT (seconds) if a process needs longer alone")
            self.shown_elsewhere = False
            return
        super().__init__(f"another process of this run stopped while this one waited in {op} "
                         f"({type(exc).__name__}: {first[:160]})", "its own error, or the launcher's report, says why")
        # under koret's launcher the launcher prints the one line that names the process that died
        self.shown_elsewhere = bool(os.environ.get(_LAUNCHED))


_LAUNCHED = "KORET_LAUNCHER"


@contextlib.contextmanager
def _collective(op: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # gloo / NCCL: "Connection closed by peer", "Connection reset", DistBackendError
        raise PeerLost(op, exc) from exc


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    if world_size() > 1:
        with _collective("a barrier"):
            _state().wait_for_everyone()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single-process run)."""
    if world_size() <= 1:
        return [obj]
    from accelerate.utils import gather_object

    _state()
    with _collective("gather_object"):
        return list(gather_object([obj]))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on the main process, None on the others (unlike
    :func:`gather_objects`, only the main process holds them all)."""
    return gather_to(obj, 0)


def gather_to(obj: Any, dst: int) -> list[Any] | None:
    """Every process's ``obj`` in rank order on process ``dst``, None on the others."""
    if world_size() <= 1:
        return [obj]
    import torch.distributed as td

    _state()
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    with _collective("gather_object"):
        td.gather_object(obj, out, dst=dst)
    return out


def exchange(parts: list[Any]) -> list[Any]:
    """All-to-all: this process sends ``parts[d]`` to process ``d`` and gets, in rank order, what every process
    sent it (``[parts[0]]`` in a single-process run). One gather per destination."""
    if world_size() <= 1:
        return [parts[0]]
    got: list[Any] = []
    for dst in range(world_size()):
        mine = gather_to(parts[dst], dst)
        if mine is not None:
            got = mine
    return got


def scatter_from_main(parts: list[Any] | None) -> Any:
    """Process ``r`` gets ``parts[r]`` of the main process's list (the others pass None)."""
    if world_size() <= 1:
        return parts[0] if parts else None
    import torch.distributed as td

    _state()
    box: list[Any] = [None]
    with _collective("scatter_object_list"):
        td.scatter_object_list(box, parts if is_main() else None, src=0)
    return box[0]


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if world_size() <= 1:
        return obj
    import torch.distributed as td

    _state()
    box = [obj if is_main() else None]
    with _collective("broadcast_object_list"):
        td.broadcast_object_list(box, src=0)
    return box[0]


class FileSync:
    """Meeting points between the processes of a launched ``koret run``, through small files in a folder every
    process sees (the run folder, like the embedding cache).

    A collective barrier would time out (NCCL/gloo's default is 10-30 minutes) while the main process runs a
    long single-process stage (a large evaluation); files wait as long as needed. If a process dies, the
    launcher (torchrun / accelerate launch) ends the others.
    """

    def __init__(self, root: Path, token: str, poll_seconds: float = 0.2) -> None:
        self.dir = root / ".koret-sync" / token
        self.poll = poll_seconds
        self.steps = 0

    @classmethod
    def start(cls, root: Path) -> FileSync:
        """Agree on a fresh folder (one collective call, at the start when every process is there)."""
        token = uuid.uuid4().hex[:12]
        if is_main() and (root / ".koret-sync").exists():
            shutil.rmtree(root / ".koret-sync", ignore_errors=True)  # stale folders of earlier runs
        token = gather_objects(token)[0]
        sync = cls(root, token)
        if is_main():
            sync.dir.mkdir(parents=True, exist_ok=True)
        barrier()
        return sync

    def exchange(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Post ``payload`` and return every process's, in rank order, once all have posted."""
        from koret.io import write_json

        step = self.steps
        self.steps += 1
        write_json(self.dir / f"{step}.{launched_rank()}.json", payload)
        paths = [self.dir / f"{step}.{r}.json" for r in range(launched_world_size())]
        while not all(p.exists() for p in paths):
            time.sleep(self.poll)
        return [json.loads(p.read_text()) for p in paths]

    def close(self) -> None:
        """After the last exchange every process is at the end: one barrier, then the folder goes."""
        barrier()
        if is_main():
            shutil.rmtree(self.dir.parent, ignore_errors=True)


def launch(num_processes: int, module_args: list[str]) -> int:
    """Re-run ``python -m koret <module_args>`` as ``num_processes`` processes on this machine; returns the exit code.

    This is torchrun's launcher, called in-process: one process per GPU (each takes ``cuda:LOCAL_RANK``, NCCL)
    or, without GPUs, CPU processes with gloo (``accelerate launch --cpu`` starts a single process unless MPI
    is set up, so it cannot be used there). koret's processes print their own one-line errors, so the
    launcher's traceback and failure report are left out.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ[_LAUNCHED] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_processes))))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--nproc_per_node", str(num_processes), "--master_port", str(_free_port()),
                                         "-m", "koret", *module_args])
    try:
        run(args)
    except ChildFailedError as exc:
        code, line = failure_report({r: (f.exitcode, f.signal_name() if f.exitcode < 0 else "")
                                     for r, f in exc.failures.items()}, num_processes)
        if line:
            print(f"error: {line}", file=sys.stderr)
        return code
    return 0


def failure_report(failures: dict[int, tuple[int, str]], world: int) -> tuple[int, str]:
    """The exit code and the one line to print for a launched run whose processes failed: ``failures`` maps
    global rank to (exit code, signal name). A process that ended with koret's own error (exit 2) has printed
    it; a process killed by a signal (the kernel's OOM killer, a preemption) printed nothing, so the launcher
    says which one it was. Pure."""
    codes = {r: c for r, (c, _) in failures.items()}
    if 2 in codes.values():
        return 2, ""
    killed = sorted((r, name) for r, (c, name) in failures.items() if c < 0)
    if killed:
        # the launcher stops the survivors with SIGTERM: report the process that died first, not those
        rank, name = next(((r, n) for r, n in killed if n != "SIGTERM"), killed[0])
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return 1, (f"process {rank} of {world} was killed by {name}{why}, so the run stopped; rerun the same "
                   "command to resume: finished embedding shards are reused (koret train: add --resume)")
    return next((c for c in codes.values() if c > 0), 1), ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
