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


def save_results(results: Dict, out: str):
    """Write ``OUT/results.json`` and return ``matplotlib.pyplot`` set up for files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return plt
