"""The project's user-facing errors: bad input, as opposed to bugs.

Every error the package raises for a mistake in what a user gave it (a file, a flag, a data
line) derives from :class:`SharkInputError`, whose message alone tells the user what to fix
(file, line or key path, flag, and what was wrong).  The command lines (the recipes through
:func:`~shark_torchrec.training.distributed.run_job`, and ``shark-torchrec``) print such an
error as one line and exit non-zero; anything else is a bug and keeps its traceback.

:class:`SharkInputError` is only a marker: each concrete error also derives from the built-in
type it has always been (``ExportError`` and ``OverridesError`` are ``ValueError``\\ s,
``CheckpointError`` a ``RuntimeError``, ...), so existing ``except`` clauses keep working.

    ======================================================  ======================================
    error                                                   raised for
    ======================================================  ======================================
    :class:`~shark_torchrec.data.click_log.MalformedLineError`  a click-log line (``file:line``)
    :class:`~shark_torchrec.planning.overrides.OverridesError`  a planner-overrides file
    :class:`~shark_torchrec.export.ExportError`             an export file
    :class:`~shark_torchrec.training.checkpoint.CheckpointError`  a checkpoint directory
    :class:`~shark_torchrec.pruning.plan.PlanError`         a pruning plan or its file
    :class:`~shark_torchrec.data.schema_file.SchemaFileError`  a ``--schema`` file (file:line, key path)
    :class:`~shark_torchrec.training.datasets.NoRowsError`  a split with no rows to read
    :class:`~shark_torchrec.data.movielens.DatasetUnavailableError`  ML-100K cannot be fetched
    :class:`~shark_torchrec.pruning.inputs.MissingFeatureError`  a batch lacking a kept feature
    :class:`~shark_torchrec.quant.tiers.BudgetError`        a byte budget below what must be stored
    :class:`InputFileNotFoundError`                         a path given on the command line
    :class:`FlagError`                                      flags that contradict each other
    :class:`~shark_torchrec.cli.DoesNotFitError`            ``plan``: a model the topology cannot hold
    :class:`~shark_torchrec.stages.StageRecordError`        a stage's ``done.json`` in a run directory
    ======================================================  ======================================
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


class SharkInputError(Exception):
    """Base of the errors for bad user input (the message names what to fix)."""


class InputFileNotFoundError(SharkInputError, FileNotFoundError):
    """A file or directory named by the user (a flag, a config entry) does not exist."""


class FlagError(SharkInputError, ValueError):
    """Command-line flags whose values cannot work together (each valid alone; single values
    are checked when parsed, see :mod:`shark_torchrec.cli_args`); the message names the flags."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line.

    An error raised in a ``DataLoader`` worker reaches the main process re-created with the
    worker's whole traceback as its message ("Caught X in DataLoader worker process 0.
    Original Traceback ..."); its last line is the original ``module.Type: message``.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(error).__module__}.{type(error).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(line.strip() for line in text.splitlines()) or type(error).__name__


def report_input_error(error: BaseException, prog: Optional[str] = None, rank: Optional[int] = None,
                       stream: Optional[TextIO] = None) -> None:
    """Print ``error`` as ``PROG: error: MESSAGE`` (argparse's form), or
    ``PROG [rank R]: error: MESSAGE`` when ``rank`` is given (one line per failing rank under
    ``torchrun``: the error may come from one rank's share of the data only)."""
    prog = prog or os.path.basename(sys.argv[0]) or "shark-torchrec"
    where = f"{prog} [rank {rank}]" if rank is not None else prog
    print(f"{where}: error: {one_line(error)}", file=stream or sys.stderr, flush=True)
