"""Run recipes/shark_dlrm.py with every way of gathering a sharded table made to raise: the
pipeline must compress, evaluate and export without one.  Used by
tests/test_recipe_shark_dlrm.py."""

import sys

from torch.distributed._shard.sharded_tensor import ShardedTensor

import shark_torchrec.training.gather as gather


def refuse(*args, **kwargs):
    raise AssertionError("a sharded table was gathered")


gather.full_state_dict = refuse
ShardedTensor.gather = refuse

from shark_torchrec.cli_run import parse_pipeline  # noqa: E402  (after the patches)
from shark_torchrec.pipeline import run  # noqa: E402
from shark_torchrec.training.distributed import exit_worker  # noqa: E402

run(parse_pipeline(sys.argv[1:]))
exit_worker(0)
