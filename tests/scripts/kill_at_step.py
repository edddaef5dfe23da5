"""Run a recipe in this process and kill it with SIGKILL (no cleanup, as an OOM killer or a
preempted machine would) after the N-th training step of the loop whose progress-bar
description starts with a prefix.  Used by tests/test_recipe_shark_dlrm.py.

    KILL_AT_STEP=5 KILL_IN="fine-tune (pruned)" python kill_at_step.py recipes/shark_dlrm.py ARGS...

``KILL_AT_STEP=0``: never kill; ``STEPS_FILE``: kept up to date with how many steps those
loops took in this process (a resumed run takes only the steps after its checkpoint; written
at every step: the recipes end without interpreter finalization, so atexit would not run).
"""

import os
import runpy
import signal
import sys

from shark_torchrec.training.trainer import DLRMTrainer

AT = int(os.environ["KILL_AT_STEP"])
IN = os.environ.get("KILL_IN", "")
_train = DLRMTrainer.train
_steps = [0]


def train(self, batches, max_steps=None, on_step=None, total=None, desc="train"):
    if not desc.startswith(IN):
        return _train(self, batches, max_steps, on_step, total, desc)

    def step(i, loss):
        if on_step is not None:
            on_step(i, loss)  # (the loop's checkpoint, if one is due, is written first)
        _steps[0] += 1
        if os.environ.get("STEPS_FILE"):
            with open(os.environ["STEPS_FILE"], "w") as f:
                f.write(str(_steps[0]))
        if _steps[0] == AT:
            os.kill(os.getpid(), signal.SIGKILL)

    return _train(self, batches, max_steps, step, total, desc)


DLRMTrainer.train = train
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
