"""Process-group set-up for ``torchrun`` and for a single plain process."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from shark_torchrec.errors import SharkInputError, report_input_error
from shark_torchrec.run_config import JobRun

T = TypeVar("T")


class DeviceUnavailableError(SharkInputError, RuntimeError):
    """The device asked for (``--device``) is not there."""


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
        raise DeviceUnavailableError("--device cuda: CUDA is not available on this machine")
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


def run_job(config: JobRun, job: Callable[[Any, DistEnv], Any]) -> Any:
    """Run a recipe's ``job(config, env)`` in a process group: ``config`` is its run config
    (:class:`~shark_torchrec.run_config.JobRun`; ``config.training.device``,
    ``config.output.log_level``),
    logging set up per rank, one intra-op thread share per rank on CPU, and the group torn down
    afterwards (synchronised on success, see :func:`destroy_distributed`).

    Bad input (a :class:`~shark_torchrec.errors.SharkInputError`, or a ``SystemExit`` with a
    message) is printed as one line, ``PROG: error: MESSAGE`` (``PROG [rank R]: ...`` under
    ``torchrun`` with more than one rank: every rank that fails says so, since bad data may
    reach one rank only), and ends the job with ``SystemExit(1)`` after the group is torn down;
    with ``config.output.debug`` the error propagates with its traceback.  Other exceptions are bugs:
    they propagate unchanged.  Recipes call this through :func:`run_or_exit`.
    """
    # torchrec 1.8 warns about its own internals (DDP's broadcast_buffers, the planner's
    # default storage reservation) on every run; nothing a user of the recipes can change.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    try:
        env = init_distributed(config.training.device)
        logging.basicConfig(
            level=logging.WARNING,
            format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s",
            force=True,  # torchrec/fbgemm configure the root logger on import
        )
        logging.getLogger("shark_torchrec").setLevel(
            getattr(logging, config.output.log_level.upper()) if env.is_main else logging.WARNING
        )
        if env.device.type == "cpu":
            # torchrun puts N ranks on the same cores: give each its share of intra-op threads.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
        result = job(config, env)
    except (SharkInputError, SystemExit) as e:
        # No barrier: the other ranks may have failed too, or be waiting in a collective that
        # will never complete (torchrun ends them once this rank exits non-zero).
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        destroy_distributed()
        if isinstance(e, SystemExit) and (e.code is None or isinstance(e.code, int)):
            raise  # a plain exit status: nothing to report
        if config.output.debug:
            raise
        error = SharkInputError(str(e.code)) if isinstance(e, SystemExit) else e
        report_input_error(error, rank=rank if world_size > 1 else None)
        raise SystemExit(1) from None
    except BaseException:
        destroy_distributed()
        raise
    destroy_distributed(synchronize=True)
    return result


def run_or_exit(main: Callable[[], T]) -> T:
    """``main()`` from a recipe's ``__main__``; when it raises ``SystemExit`` (a parse error,
    or bad input reported by :func:`run_job`), end the process with that status through
    :func:`exit_worker` (a message in the ``SystemExit`` printed first), so that a failing
    rank skips interpreter finalization too.  Bugs propagate with their traceback."""
    try:
        return main()
    except SystemExit as e:
        _exit_with(e)


def _exit_with(e: SystemExit) -> NoReturn:
    if e.code is None or isinstance(e.code, int):
        exit_worker(e.code or 0)
    print(e.code, file=sys.stderr)  # what Python prints for SystemExit("message")
    exit_worker(1)
