"""Shared by the evaluation tools: their command lines, where results go and how plots are made
headless."""

import json
import os
import sys
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


def finished_report(run_dir: str, keys: Dict[str, str]) -> bool:
    """Whether ``run_dir`` holds a pipeline run finished with these stage ``keys`` (its
    ``report.json``, and every stage's record of the same key).  A report left by a run with
    other flags (or data) is removed, so that the run is made again — the recipe then reruns
    the stages whose keys changed — instead of being read under the new flags."""
    from shark_torchrec.stages import StageStore

    report = os.path.join(run_dir, "report.json")
    if not os.path.isfile(report):
        return False
    store = StageStore(run_dir)
    stale = [s for s, key in keys.items() if (store.read(s) or {}).get("key") != key]
    if stale:
        print(f"{run_dir}: finished with other inputs (stages {stale}): running it again", file=sys.stderr, flush=True)
        os.remove(report)
        return False
    return True


def distinct(values: List, flag: str) -> List:
    """``values`` if none repeats, else an error naming ``flag`` (a repeated seed would count one
    run twice: a zero-width interval)."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise SystemExit(f"{flag}: {repeated} given more than once")
    return values


def save_results(results: Dict, out: str):
    """Write ``OUT/results.json`` and return ``matplotlib.pyplot`` set up for files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return plt
