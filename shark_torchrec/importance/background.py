"""Running a tracker's per-step work beside the training step.

The trackers' accumulations read a step's tensors (pooled embeddings and their gradients, the
batch's ids and labels) and write only the trackers' own sums, which nothing reads until a
result is asked for.  So they can run on a worker thread while the step goes on — their
kernels release the GIL — and the step only pays for handing them over.  Collectives stay on
the calling thread (their order must be the same on every rank), except over a process group
the worker alone uses, in step order (the field tracker's batch statistics: ``TaylorFieldImportance._stats_group``).

Results are read after :meth:`Background.drain`, which waits for the work handed over so far
and re-raises the first error one of them met (on the thread that drains).  That error stays:
the work after it was skipped, so the sums miss steps that the step counts include, and every
later :meth:`~Background.drain` and :meth:`~Background.submit` raises until the tracker replaces
its sums (:meth:`~Background.discard`: ``reset()``, ``load_state_dict()``).  (It was raised once
and then cleared: a caller that caught it and trained on read sums missing every step between
the failure and that drain, without a word.)
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


class Background:
    """One worker thread, started on first use, running submitted callables in order.

    At most :attr:`MAX_PENDING` callables wait: a submit beyond them waits for the worker.  Each
    holds its step's tensors (a DLRM step's pooled embeddings and their gradients, tens of MB),
    so a worker slower than the steps must hold the training back rather than let them pile up.

    Args:
        enabled: ``False`` runs every callable at once on the caller's thread (the same
            results, no overlap).
    """

    MAX_PENDING = 8

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._queue: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue(maxsize=self.MAX_PENDING)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._reported = False  # (the error raised once already: later ones say what it left)
        self._lock = threading.Lock()

    def __getstate__(self):  # threads do not pickle or deep-copy
        return {"enabled": self.enabled}

    def __setstate__(self, state):
        self.__init__(state["enabled"])

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                if fn is None:
                    return
                if self._error is None:  # after an error, the rest is skipped until drained
                    fn()
            except BaseException as e:  # handed to the thread that drains
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._error is not None:
            self._raise()
        if not self.enabled:
            fn()
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shark-tracker", daemon=True)
                self._thread.start()
        self._queue.put(fn)

    def drain(self) -> None:
        """Wait for every submitted callable; re-raise the first error one of them raised (and,
        once it has been raised, an error saying the sums miss steps, until :meth:`discard`)."""
        if self._thread is not None:
            self._queue.join()
        if self._error is not None:
            self._raise()

    def discard(self) -> None:
        """Wait for every submitted callable and forget an error: for a tracker about to replace
        its sums (a reset, a loaded state), which are whole again after it."""
        if self._thread is not None:
            self._queue.join()
        self._error, self._reported = None, False

    def _raise(self) -> None:
        if not self._reported:
            self._reported = True
            raise self._error
        raise RuntimeError("a tracker step's work failed earlier (raised then): the steps after it were "
                           "not counted, so its sums are incomplete; reset() it or load a saved state"
                           ) from self._error
