"""Process topology for runs under ``accelerate launch`` / torchrun (one process when not launched).

koret only needs rank, world size and a barrier; accelerate's :class:`~accelerate.PartialState` provides them and
picks the backend (NCCL on GPUs, gloo on CPUs). Nothing is initialised for a plain single-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@lru_cache(maxsize=1)
def _state() -> Any:
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate ignores WORLD_SIZE on a machine without GPUs and runs single-process
    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    if world_size() > 1:
        _state().wait_for_everyone()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single-process run)."""
    if world_size() <= 1:
        return [obj]
    from accelerate.utils import gather_object

    _state()
    return list(gather_object([obj]))


def launch(num_processes: int, module_args: list[str]) -> int:
    """Re-run ``python -m koret <module_args>`` as ``num_processes`` processes on this machine.

    With GPUs this is ``accelerate launch --multi_gpu`` (one GPU per process, NCCL). Without, it is torchrun with
    gloo: ``accelerate launch --cpu`` starts a single process unless MPI is set up, so it cannot be used here.
    """
    import torch

    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "--master_port", str(_free_port())]
    cmd += ["-m", "koret", *module_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_processes))))
    return subprocess.call(cmd, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
