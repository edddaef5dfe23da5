"""Shared by the evaluation tools: their command lines, where results go and how plots are made
headless."""

import json
import os
from typing import Dict, List, Tuple


def split_recipe_args(argv: List[str]) -> Tuple[List[str], List[str]]:
    """``(the tool's own flags, the recipe's flags)`` of ``tool [own...] -- [recipe...]``."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def pipeline_stage_keys(argv: List[str], world_size: int = 1) -> Dict[str, str]:
    """The stage keys of ``recipes/shark_dlrm.py ARGV`` on ``world_size`` processes: what a
    tool's runs may share (:class:`shark_torchrec.stages.StageSharing`)."""
    from shark_torchrec.cli_run import parse_pipeline
    from shark_torchrec.pipeline import resolved_device, stage_keys

    run = parse_pipeline([str(a) for a in argv])
    return stage_keys(run, resolved_device(run.training.device), world_size)


def save_results(results: Dict, out: str):
    """Write ``OUT/results.json`` and return ``matplotlib.pyplot`` set up for files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return plt
