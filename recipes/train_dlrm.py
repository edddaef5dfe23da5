#!/usr/bin/env python
"""Train TorchRec's DLRM (or DLRM_DCN) sharded with DistributedModelParallel.

    torchrun --nproc_per_node 2 recipes/train_dlrm.py --data synthetic --out runs/demo
    python recipes/train_dlrm.py --data criteo --data_path ../shared/data/criteo_kaggle_sample

Writes OUT/metrics.json (test AUC, log loss, steps, examples/s, wall time) and
OUT/checkpoints/.  `--help` lists every option.
"""

import json
import time

from shark_torchrec.training.distributed import exit_worker, run_or_exit
from shark_torchrec.cli_run import parse_train
from shark_torchrec.training.train_dlrm import run

if __name__ == "__main__":
    t0 = time.perf_counter()
    config = run_or_exit(parse_train)
    metrics = run_or_exit(lambda: run(config))
    if metrics["rank"] == 0:
        print(json.dumps({k: metrics[k] for k in ("test_auc", "test_log_loss", "steps",
                                                   "examples_per_second")}),
              f"wall {time.perf_counter() - t0:.1f}s")
    exit_worker(0)
