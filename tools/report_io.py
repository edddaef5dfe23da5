"""Shared by the evaluation tools: where results go and how plots are made headless."""

import json
import os
from typing import Dict


def save_results(results: Dict, out: str):
    """Write ``OUT/results.json`` and return ``matplotlib.pyplot`` set up for files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return plt
