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


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; the world size when unset)."""
    return 1 if _solo["on"] else int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def local_rank() -> int:
    """This process's index among the processes of its machine (``LOCAL_RANK``): which of its GPUs it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Run a single-process stage on the main process of a launched job: inside, koret's own code sees one
    process (no collectives), while the other processes wait for it in :func:`agree`."""
    previous = _solo["on"]
    _solo["on"] = True
    try:
        yield
    finally:
        _solo["on"] = previous


def slice_of(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of ``n`` items (corpus shards, queries) that process ``rank`` of ``world_size`` owns:
    ``[r n / w, (r + 1) n / w)``. Used to split the corpus in mine and the sharded search, and queries in BM25,
    rescoring and filtering."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


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
    """The one deadline for waiting on other processes: ``KORET_COLLECTIVE_TIMEOUT`` seconds, default 6 hours,
    for every collective (the data ones and :func:`agree` / :func:`wait_for_all` of ``koret run``). torch's
    defaults (30 minutes for gloo, 10 for NCCL) are shorter than work koret does on the main process alone while
    the others wait (BM25 over a large corpus, an evaluation). A process that dies or fails is not waited for:
    its peers' collectives fail at once (closed connection) and the launcher stops the rest."""
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
    """Another process of the run ended (killed, crashed, failed) while this one waited for it in a collective."""

    exit_code = 1

    def __init__(self, op: str, exc: Exception) -> None:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        self.timed_out = "timed out" in first.lower()
        if self.timed_out:
            seconds = collective_timeout().total_seconds()
            super().__init__(f"waited {seconds:g} s in {op} for the other processes of this run and gave up "
                             f"({type(exc).__name__}: {first[:160]})",
                             "raise KORET_COLLECTIVE_TIMEOUT (seconds) if a process needs longer alone")
            return
        super().__init__(f"another process of this run stopped while this one waited in {op} "
                         f"({type(exc).__name__}: {first[:160]})", "its own error, or the launcher's report, says why")


class Stopped(BaseException):
    """This process got SIGTERM: the launcher stops the others when one process fails (or when it is itself
    interrupted), a scheduler preempts. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (a shard reader that would treat it as a corrupt file, a library's retry) swallows it."""

    exit_code = 143

    def __init__(self) -> None:
        super().__init__("stopped by SIGTERM (the launcher stops every process when one fails; or preempted)")


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


def all_to_all(parts: list[Any]) -> list[Any]:
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


# --------------------------------------------------------------------------------------------- koret run's waits


@lru_cache(maxsize=1)
def _control_group() -> Any:
    """The group ``koret run`` waits in: gloo (TCP, CPU), so a process that waits while the main process runs a
    single-process stage occupies no GPU, and a peer that exits is noticed at once. On CPU runs the default
    group is gloo already; under NCCL a gloo group over the same processes is created (a collective call)."""
    import torch.distributed as td

    _state()
    if td.get_backend() == "gloo":
        return None
    return td.new_group(backend="gloo", timeout=collective_timeout())


def start_control() -> None:
    """Create the control group; every process calls it at the same point (the start of ``koret run``)."""
    if world_size() > 1:
        _control_group()


def agree(obj: Any) -> Any:
    """The main process's ``obj`` on every process, through the control group. The processes that wait here
    while the main process works alone wait up to :func:`collective_timeout`; if the main process ends (its own
    error, killed), they fail at once with :class:`PeerLost`."""
    if world_size() <= 1:
        return obj
    import torch.distributed as td

    box = [obj if is_main() else None]
    with _collective("koret run's wait for the main process"):
        td.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def wait_for_all() -> None:
    """A barrier through the control group (see :func:`agree`)."""
    if world_size() > 1:
        import torch.distributed as td

        with _collective("koret run's final barrier"):
            td.barrier(group=_control_group())


# --------------------------------------------------------------------------------------------- failures

_FAILURES = "KORET_FAILURE_DIR"  # set by :func:`launch`: each failing process leaves its record there


def launched_by_koret() -> bool:
    """Under ``--num-processes N``: the launcher, not each process, prints the run's one error line."""
    return bool(os.environ.get(_FAILURES))


def record_failure(exc: BaseException, detail: str = "") -> None:
    """Leave this process's failure for the launcher: ``kind`` is ``error`` (koret's one-line error: the cause),
    ``peer`` (a collective failed because another process ended, or the deadline passed), ``stopped`` (SIGTERM
    from the launcher) or ``crash`` (any other exception: a bug, with its traceback in ``detail``)."""
    folder = os.environ.get(_FAILURES)
    if not folder:
        return
    from koret.io import write_json

    if isinstance(exc, PeerLost):
        kind = "timeout" if exc.timed_out else "peer"
    elif isinstance(exc, Stopped):
        kind = "stopped"
    elif isinstance(exc, KoretError):
        kind = "error"
    elif is_peer_loss(exc):
        kind = "peer"
    else:
        kind = "crash"
    message = str(exc) if isinstance(exc, (KoretError, Stopped)) else f"{type(exc).__name__}: {exc}"
    write_json(Path(folder) / f"{launched_rank()}.json", {"rank": launched_rank(), "kind": kind,
                                                          "message": message, "detail": detail,
                                                          "time": time.time()})


_PEER_LOSS = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted",
              "nccl communicator", "socket timeout")


def is_peer_loss(exc: BaseException) -> bool:
    """A library's collective (DDP's all-reduce, accelerate's gather) failing because another process ended:
    gloo's and NCCL's RuntimeError / DistBackendError, which koret's own collectives turn into :class:`PeerLost`."""
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _PEER_LOSS)


def read_failures(folder: str | Path | None = None) -> dict[int, dict[str, Any]]:
    """The failure records of this run's processes (see :func:`record_failure`), by rank."""
    folder = folder or os.environ.get(_FAILURES)
    out: dict[int, dict[str, Any]] = {}
    if not folder or not Path(folder).is_dir():
        return out
    for path in Path(folder).glob("*.json"):
        try:
            record = json.loads(path.read_text())
            out[int(record["rank"])] = record
        except (ValueError, KeyError, OSError):
            continue
    return out


def earliest_failure(records: dict[int, dict[str, Any]], kind: str) -> int | None:
    """The rank whose record of ``kind`` came first (ties: the lower rank), or None. Pure."""
    found = sorted((rec["time"], r) for r, rec in records.items() if rec.get("kind") == kind)
    return found[0][1] if found else None


def stop_on_sigterm() -> None:
    """Turn the launcher's SIGTERM into :class:`Stopped`, once: the stage unwinds, ``koret run`` writes its
    summary (the stage marked failed, its record removed). A SIGTERM while the process already unwinds another
    failure, or a second one, is ignored (the launcher sends SIGKILL 30 s later). Processes forked from this one
    (data-loader workers, which the launcher's process-group SIGTERM reaches too) get the default handler back."""
    import signal

    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked child that inherited this handler: end as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sys.exc_info()[0] is not None:  # already unwinding a failure: let it finish (summary, record)
            return
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def ignore_stop() -> None:
    """While a process reports its failure (the summary, its record), the launcher's SIGTERM must not cut that
    short with a second exception: ignore it (SIGKILL follows 30 s later if the process hangs)."""
    if launched_by_koret():
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def launch(num_processes: int, module_args: list[str]) -> int:
    """Re-run ``python -m koret <module_args>`` as ``num_processes`` processes on this machine; returns the exit code.

    This is torchrun's launcher, called in-process: one process per GPU (each takes ``cuda:LOCAL_RANK``, NCCL)
    or, without GPUs, CPU processes with gloo (``accelerate launch --cpu`` starts a single process unless MPI
    is set up, so it cannot be used there). When a process fails, torchrun stops the others (SIGTERM within a
    second, SIGKILL 30 s later); each process leaves a failure record instead of printing, and this prints the
    run's one line: the error that caused it, naming its process (:func:`failure_report`).
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_processes))))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--nproc_per_node", str(num_processes), "--master_port", str(_free_port()),
                                         "-m", "koret", *module_args])
    from torch.distributed.elastic.multiprocessing.api import SignalException

    folder = tempfile.mkdtemp(prefix="koret-failures-")
    os.environ[_FAILURES] = folder
    try:
        run(args)
    except ChildFailedError as exc:
        code, line, detail = failure_report({r: (f.exitcode, f.signal_name() if f.exitcode < 0 else "",
                                                 float(f.timestamp)) for r, f in exc.failures.items()},
                                            num_processes, read_failures(folder))
        if detail:
            print(detail.rstrip(), file=sys.stderr)
        print(f"error: {line}", file=sys.stderr)
        return code
    except SignalException as exc:  # Ctrl-C or a scheduler's SIGTERM to this launcher: it stopped the processes
        print(f"interrupted ({exc.sigval.name}): the run's processes were stopped; rerun the same command to resume",
              file=sys.stderr)
        return 130 if exc.sigval.name == "SIGINT" else 143
    finally:
        os.environ.pop(_FAILURES, None)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def failure_report(failures: dict[int, tuple[int, str, float]], world: int,
                   records: dict[int, dict[str, Any]] | None = None) -> tuple[int, str, str]:
    """The exit code, the one line and any traceback to print for a launched run whose processes failed.

    ``failures`` maps global rank to (exit code, signal name, time the launcher saw it end) as torchrun reports
    them; ``records`` are the processes' own failure records (:func:`record_failure`). torchrun stops the others
    once one process ends badly (SIGTERM at once, SIGKILL to those still running 30 s later) and reports those
    too: only the processes that ended within :data:`FIRST_WAVE_SECONDS` of the first one can be the cause. The
    cause, in this order: koret's own error on a process (the earliest record); a process killed by a signal
    other than SIGTERM (the kernel's OOM killer: it recorded nothing); an exception in koret (a bug: its
    traceback is returned); a collective's deadline; the earliest exit code of a process that did not merely see
    another end or get stopped; else a process stopped by SIGTERM from outside (preempted). Pure."""
    records = records or {}
    first = min((t for _, _, t in failures.values()), default=0.0)
    wave = {r for r, (_, _, t) in failures.items() if t <= first + FIRST_WAVE_SECONDS}
    in_wave = {r: rec for r, rec in records.items() if r in wave or r not in failures}

    def earliest(kind: str) -> int | None:
        return earliest_failure(in_wave, kind)

    resume = ("rerun the same command to resume: finished embedding shards are reused (koret train: add "
              "--resume)")
    rank = earliest("error")
    if rank is not None:
        return 2, f"process {rank} of {world}: {records[rank]['message']}", ""
    killed = sorted((t, r, name) for r, (c, name, t) in failures.items() if r in wave and c < 0 and name != "SIGTERM")
    if killed:
        _, rank, name = killed[0]
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return 1, f"process {rank} of {world} was killed by {name}{why}, so the run stopped; {resume}", ""
    rank = earliest("crash")
    if rank is not None:
        return 1, f"process {rank} of {world} failed: {records[rank]['message'][:300]}", records[rank].get("detail", "")
    rank = earliest("timeout")
    if rank is not None:
        return 1, f"process {rank} of {world}: {records[rank]['message']}", ""
    codes = sorted((t, r, c) for r, (c, name, t) in failures.items()
                   if r in wave and name != "SIGTERM" and records.get(r, {}).get("kind") not in ("peer", "stopped"))
    if codes:
        _, rank, code = codes[0]
        how = f"with exit code {code}" if code >= 0 else f"by {failures[rank][1] or 'a signal'}"
        return (code if code > 0 else 1), f"process {rank} of {world} ended {how} without a message; {resume}", ""
    stopped = sorted((t, r) for r, (c, name, t) in failures.items()
                     if r in wave and (name == "SIGTERM" or records.get(r, {}).get("kind") == "stopped"))
    if stopped:
        return 1, (f"process {stopped[0][1]} of {world} was stopped by SIGTERM (preempted?), so the run stopped; "
                   f"{resume}"), ""
    return 1, f"the run's {world} processes failed and none said why; {resume}", ""


FIRST_WAVE_SECONDS = 10.0  # torchrun's SIGKILL of the processes that outlived its SIGTERM comes 30 s later


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
