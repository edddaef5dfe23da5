#!/usr/bin/env python
"""SHARK on a DLRM: train with field and row trackers, prune fields, fine-tune, row-wise mixed
precision, evaluate every stage, export.  Interrupted runs resume from the last finished stage.

    torchrun --standalone --nproc_per_node 2 recipes/shark_dlrm.py --data synthetic --out runs/shark
    python recipes/shark_dlrm.py --data criteo --data_path ../shared/data/criteo_kaggle_sample --out runs/shark_criteo

Takes the data, model and training flags of recipes/train_dlrm.py (not --max_steps, --score_fields
or --resume), plus --keep_fields / --drop_fraction,
--prune_baseline, --finetune_epochs, --quant_budget_fraction and --stop_after.
"""

import json
import os

from shark_torchrec.cli_run import parse_pipeline
from shark_torchrec.pipeline import run
from shark_torchrec.training.distributed import exit_worker, run_or_exit

if __name__ == "__main__":
    config = run_or_exit(parse_pipeline)
    report = run_or_exit(lambda: run(config))
    if int(os.environ.get("RANK", 0)) == 0 and report.get("stages", {}).get("quantized"):
        print(json.dumps({stage: round(m["auc"], 4) for stage, m in report["stages"].items()}))
        print(f"report: {os.path.join(config.output.out, 'report.md')}")
    exit_worker(0)
