#!/usr/bin/env python
"""Prune feature fields of a DLRM trained by recipes/train_dlrm.py, fine-tune it sharded,
and evaluate it before and after.

    torchrun --nproc_per_node 2 recipes/train_dlrm.py --data synthetic --score_fields mean --out runs/base
    torchrun --nproc_per_node 2 recipes/prune_dlrm.py --data synthetic --from_run runs/base \
        --keep_fields 10 --out runs/pruned
    # iterative: 3 rounds of (score 20 steps → drop → fine-tune 20 steps) down to 8 fields
    torchrun --nproc_per_node 2 recipes/prune_dlrm.py --data synthetic --from_run runs/base \
        --rounds 3 --keep_fields 8 --out runs/pruned_iter

Pass the same data and model flags as the training run.  Writes OUT/plan.json,
OUT/metrics.json (AUC and log loss before/after, fields, tables and bytes) and OUT/checkpoints/.
"""

import json

from shark_torchrec.cli_run import parse_prune
from shark_torchrec.pruning.recipe import run
from shark_torchrec.training.distributed import exit_worker, run_or_exit

if __name__ == "__main__":
    config = run_or_exit(parse_prune)
    m = run_or_exit(lambda: run(config))
    if m["rank"] == 0:
        print(json.dumps({"auc_before": m["before"]["auc"], "auc_after": m["after"]["auc"],
                          "fields": f"{m['plan']['fields_before']} -> {m['plan']['fields_after']}",
                          "bytes": f"{m['plan']['bytes_before']} -> {m['plan']['bytes_after']}"}))
    exit_worker(0)
