"""Several training processes in one pod, one per GPU, with ``torch.distributed`` between them.

    stage process (run_stage: config, cache, manifest)  ->  launch(fn, args, processes)
        rank 0 ... rank N-1: fn(Ranks(rank, N), *args), each in its own process

The stage process stays what the pipeline sees: it reads the config, decides the cache, and commits
the manifest once; the ranks only train. It starts the ranks with ``torch.multiprocessing`` (spawn),
passes SIGTERM on to every rank (the spot notice reaches the pod's first process; a local run signals
the stage process alone), and takes rank 0's result. A rank that fails with a user error or a
preemption reports it back as that, so the stage exits 2 or 143 exactly as a single process would; a
crash of any rank fails the stage. The ranks die with the stage process (``PR_SET_PDEATHSIG``): a
killed stage never leaves ranks behind writing checkpoints.

Ranks talk over NCCL on GPUs and gloo on CPU (the tests run two CPU ranks), through a TCP rendezvous
on 127.0.0.1: the processes are in one pod.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.core.errors import UserError

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one writer of what the ranks share (checkpoints, the adapter, the train log)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def resolve_processes(requested: int, device: str) -> int:
    """``requested``, or with 0 one process per visible GPU (one on CPU)."""
    import torch

    gpus = torch.cuda.device_count() if device != "cpu" else 0
    if requested == 0:
        return max(gpus, 1)
    if gpus and requested > gpus:
        raise UserError(f"processes={requested} but this pod sees {gpus} GPU(s): request one GPU per process")
    return requested


def launch(fn: Callable[..., Any], args: tuple, world: int, *, name: str, cuda: bool) -> Any:
    """Run ``fn(Ranks(rank, world), *args)`` in ``world`` processes (one per GPU with ``cuda``); rank 0's result.

    ``name`` is the stage's, for the ranks' log lines.
    """
    import torch.multiprocessing as mp

    from stages.core.runner import Preempted

    results = mp.get_context("spawn").SimpleQueue()
    terminated: list[int] = []
    ranks: list[Any] = []

    def forward(signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: passing it on to the %d training processes", world)
        terminated.append(signum)
        for process in ranks:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    # Installed before the ranks start: a SIGTERM while they start reaches them too, once they exist.
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        processes = mp.start_processes(
            _rank_main,
            args=(world, _free_port(), os.getpid(), name, cuda, results, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        ranks.extend(processes.processes)
        if terminated:
            forward(signal.SIGTERM, None)
        while not processes.join():
            pass
    except mp.ProcessExitedException:
        if terminated:  # a rank still starting, before its handler, died of the signal: nothing to save yet
            raise Preempted("SIGTERM while the training processes started; nothing was trained") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    outcomes = dict(results.get() for _ in range(world))
    for rank in range(world):  # a user error or a preemption on any rank is the stage's
        kind, value = outcomes[rank]
        if kind == "user_error":
            raise UserError(value)
        if kind == "preempted":
            raise Preempted(value)
    return outcomes[0][1]


def _rank_main(rank: int, world: int, port: int, parent: int, name: str, cuda: bool, results, fn, args) -> None:
    """One rank: die with the stage process, join the group, run ``fn``, report how it ended."""
    import torch
    import torch.distributed as dist

    from stages.core.runner import Preempted, log_format

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the stage process died before the line above: so do we
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the stage process decides
    logging.basicConfig(level=logging.INFO, format=log_format(f"{name} rank {rank}"), stream=sys.stderr, force=True)
    # The pod's CPUs shared out (OMP_NUM_THREADS, if set, decides as usual): ranks that each take every core
    # slow one another down, as torchrun knows too.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        outcome = ("ok", fn(Ranks(rank, world), *args))
    except UserError as exc:
        outcome = ("user_error", str(exc))
    except Preempted as exc:
        outcome = ("preempted", str(exc))
    finally:
        dist.destroy_process_group()
    results.put((rank, outcome))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- what the ranks agree on, collectively (no-ops with one process) --------------------------------


def any_rank(flag: bool, ranks: Ranks, device) -> bool:
    """True on every rank when it is true on any: all ranks stop at the same step."""
    if not ranks.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def total(value: float, ranks: Ranks, device) -> float:
    """The sum of ``value`` over the ranks."""
    if not ranks.distributed:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()
