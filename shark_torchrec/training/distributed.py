"""Process-group set-up for ``torchrun`` and for a single plain process."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: rank, world size and device of a (possibly 1-process) group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise ``torch.distributed`` (gloo on CPU, nccl on CUDA) and return the env.

    Under ``torchrun`` the rendezvous comes from its environment variables.  In a plain
    process (no ``RANK`` in the environment) a 1-process group is created on a private file
    store, so that the same code path (DMP, planner, collectives) runs either way.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    backend = "nccl" if device == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            store_file = tempfile.NamedTemporaryFile(prefix="shark_pg_", delete=False).name
            store = dist.FileStore(store_file, 1)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
    )


def destroy_distributed(synchronize: bool = False) -> None:
    """Tear the process group down.  ``synchronize``: first wait for every rank (on the success
    path), so that no rank closes its connections while another still talks to it — gloo can
    abort a process ("terminate called without an active exception") when a peer leaves early.
    Not on the error path: a barrier with a crashed peer would only hang."""
    if dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a recipe's process now, skipping Python's interpreter finalization (stdio and logging
    flushed first; everything a recipe writes is closed by then).

    Why: TorchRec and torchmetrics objects can keep the gloo process group's C++ state (worker
    threads holding finished work and its tensors) alive past ``destroy_process_group`` until
    finalization, where tearing it down can abort the process ("terminate called without an
    active exception"; seen in about 1 of 10 two-process test runs, always after the job had
    finished and written its results).  Call it last, from a script's ``__main__`` only."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run_job(args: argparse.Namespace, job: Callable[[argparse.Namespace, DistEnv], Any]) -> Any:
    """Run a recipe's ``job(args, env)`` in a process group (``args.device``, ``args.log_level``):
    logging set up per rank, one intra-op thread share per rank on CPU, and the group torn down
    afterwards (synchronised on success, see :func:`destroy_distributed`)."""
    # torchrec 1.8 warns about its own internals (DDP's broadcast_buffers, the planner's
    # default storage reservation) on every run; nothing a user of the recipes can change.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    env = init_distributed(args.device)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s",
        force=True,  # torchrec/fbgemm configure the root logger on import
    )
    logging.getLogger("shark_torchrec").setLevel(
        getattr(logging, args.log_level.upper()) if env.is_main else logging.WARNING
    )
    if env.device.type == "cpu":
        # torchrun puts N ranks on the same cores: give each its share of intra-op threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    try:
        result = job(args, env)
    except BaseException:
        destroy_distributed()
        raise
    destroy_distributed(synchronize=True)
    return result
