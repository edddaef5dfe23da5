"""``shark-torchrec``: the package's command line.

    shark-torchrec plan --preset criteo1tb --world_size 1 --device cuda --hbm_gb 80
    shark-torchrec plan --tables model.yaml --world_size 4 --device cuda --hbm_gb 40 --json plan.json

``plan`` prints, for a model description and a topology, the per-device memory and the table
placement of TorchRec's planner before compression (fp32) and after compress-to-fit
(:mod:`shark_torchrec.planning.compress`), and optionally writes them as JSON.  No devices are
needed: it plans for the topology described.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from shark_torchrec.cli_args import (
    DEBUG_HELP,
    closed_fraction,
    existing_file,
    nonnegative_float,
    output_file,
    positive_float,
    positive_int,
)
from shark_torchrec.errors import SharkInputError, report_input_error

GB = 1024 ** 3


class TablesFileError(SharkInputError, ValueError):
    """A ``--tables`` file that does not describe tables; the message names file and entry."""


class DoesNotFitError(SharkInputError, RuntimeError):
    """A model that does not fit the topology, even compressed (or only by dropping more rows
    than ``--max_drop_fraction`` allows)."""


def _load_tables(path: str):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise TablesFileError(f"{path}: cannot read ({e})") from e
    except yaml.YAMLError as e:
        raise TablesFileError(f"{path}: not valid YAML ({e})") from e
    rows = doc.get("tables") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise TablesFileError(f"{path}: expected 'tables:' with a list of {{name, rows, dim, features}}")
    out = []
    for i, t in enumerate(rows):
        if not isinstance(t, dict):
            raise TablesFileError(f"{path}: tables[{i}]: expected a mapping {{name, rows, dim, features}}, "
                                  f"got {t!r}")
        missing = [k for k in ("name", "rows", "dim") if k not in t]
        if missing:
            raise TablesFileError(f"{path}: tables[{i}] lacks {missing}")
        unknown = sorted(str(k) for k in t if k not in ("name", "rows", "dim", "features"))
        if unknown:  # (a misspelt 'features' would leave the table serving one feature of its name)
            raise TablesFileError(f"{path}: tables[{i}]: unknown keys {unknown} (a table takes name, rows, "
                                  "dim and features)")
        for key in ("rows", "dim"):
            if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
                raise TablesFileError(f"{path}: tables[{i}].{key}: expected an integer >= 1, got {t[key]!r}")
        features = t.get("features") or [str(t["name"])]
        if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features):
            raise TablesFileError(f"{path}: tables[{i}].features: expected a list of feature names, "
                                  f"got {features!r}")
        if any(c.name == str(t["name"]) for c in out):
            raise TablesFileError(f"{path}: tables[{i}]: table name {t['name']!r} is used twice")
        out.append(EmbeddingBagConfig(name=str(t["name"]), num_embeddings=t["rows"],
                                      embedding_dim=t["dim"], feature_names=list(features)))
    return out


def _placement(planner, world_size: int) -> Dict[str, object]:
    from shark_torchrec.planning.compress import device_storage

    tables = {}
    for so in planner._best_plan:
        tables[so.name] = {"sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
                           "ranks": sorted({s.rank for s in so.shards}),
                           "bytes": sum(s.storage.hbm + s.storage.ddr for s in so.shards)}
    return {"devices": device_storage(planner, world_size), "tables": tables}


def _plan_header(args: argparse.Namespace, tables, topology) -> Tuple[Dict[str, object], float]:
    """The report's model and topology (printed too) and the GiB per device planned against:
    the flag's, or, without ``--ddr_gb`` on CPU, TorchRec's default host memory."""
    total_fp32 = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    hbm_gb = args.hbm_gb if args.device == "cuda" else None
    ddr_gb = args.ddr_gb or topology.devices[0].storage.ddr / GB
    report: Dict[str, object] = {
        "topology": {"world_size": args.world_size, "device": args.device, "hbm_gb": hbm_gb, "ddr_gb": ddr_gb},
        "tables": len(tables), "rows": sum(t.num_embeddings for t in tables),
        "fp32_bytes": total_fp32,
    }
    print(f"model: {len(tables)} tables, {report['rows']:,} rows, {total_fp32 / GB:.1f} GiB in fp32")
    memory = hbm_gb if args.device == "cuda" else ddr_gb
    print(f"topology: {args.world_size} × {args.device}, {memory:g} GiB per device")
    return report, memory


def plan_command(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.disable(logging.WARNING)  # the planner's own chatter; results are printed below
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import PlannerError

    from shark_torchrec.planning.compress import compress_to_fit, criteo_1tb_tables, plan_inference
    from shark_torchrec.planning.overrides import load_overrides
    from shark_torchrec.quant.layout import serving_row_alignment
    from shark_torchrec.quant.tiers import BudgetError

    tables = criteo_1tb_tables(args.dim) if args.preset == "criteo1tb" else _load_tables(args.tables)
    topology = Topology(world_size=args.world_size, compute_device=args.device,
                        local_world_size=args.world_size,
                        hbm_cap=int(args.hbm_gb * GB) if args.device == "cuda" else None,
                        ddr_cap=int(args.ddr_gb * GB) if args.ddr_gb else None)
    overrides = load_overrides(args.planner_overrides, tables) if args.planner_overrides else None
    if overrides is not None and overrides.constraints:
        # (this command plans the compressed inference model; sharding types, kernels and
        # pooling estimates in the file are for the training planner)
        print(f"warning: {args.planner_overrides}: planner settings of tables {sorted(overrides.constraints)} "
              "are not applied by this command (only never_prune and compression settings are)", file=sys.stderr)
    report, memory = _plan_header(args, tables, topology)
    t0 = time.perf_counter()
    try:
        _, planner = plan_inference(tables, topology, batch_size=args.batch_size)
        before = _placement(planner, args.world_size)
        report["before"] = {"fits": True, **before}
        _print_placement("before compression (fp32)", before)
    except PlannerError as e:
        report["before"] = {"fits": False, "error": str(e).splitlines()[0]}
        print(f"\nbefore compression (fp32): does not fit — {str(e).splitlines()[0].strip()}")
    align = serving_row_alignment(args.device, args.row_alignment)
    report["row_alignment"] = align
    try:
        compression, _, planner = compress_to_fit(
            tables, topology, zipf=args.zipf, batch_size=args.batch_size,
            pins=overrides.pins if overrides else None,
            fractions=overrides.tier_fractions if overrides else None,
            table_budgets=overrides.budgets if overrides else None, row_alignment=align)
    except (PlannerError, BudgetError) as e:
        raise DoesNotFitError(f"the model does not fit {args.world_size} × {args.device} with {memory} GiB per "
                              f"device, even compressed: {str(e).splitlines()[0].strip()}") from None
    dropped = {n: c.fractions.get("drop", 0.0) for n, c in compression.items() if c.fractions.get("drop", 0.0) > 0}
    too_many = {n: f for n, f in dropped.items() if f > args.max_drop_fraction}
    if too_many:
        listed = ", ".join(f"{n} {f:.0%}" for n, f in too_many.items())
        raise DoesNotFitError(f"the model fits {args.world_size} × {args.device} with {memory} GiB per device "
                              f"only by dropping more than --max_drop_fraction {args.max_drop_fraction} of the rows "
                              f"of {len(too_many)} table(s) ({listed}; dropped rows read as zeros): add devices "
                              "or memory, or raise --max_drop_fraction")
    if dropped:
        print("\nwarning: dropped rows (they read as zeros): "
              + ", ".join(f"{n} {f:.1%}" for n, f in dropped.items()), file=sys.stderr)
    after = _placement(planner, args.world_size)
    report["after"] = {"fits": True, **after, "compression": {
        n: {"rows": c.rows, "bytes": c.bytes, "fp32_bytes": c.fp32_bytes, "predicted_loss": c.predicted_loss}
        for n, c in compression.items()}}
    report["planning_seconds"] = time.perf_counter() - t0
    _print_placement("after compress-to-fit", after)
    print("\n| table | rows | fp32 GiB | compressed GiB | tiers (fraction of rows) |")
    print("|---|---|---|---|---|")
    for n, c in compression.items():
        fr = ", ".join(f"{k} {v:.2f}" for k, v in c.fractions.items())
        print(f"| {n} | {sum(c.rows.values()):,} | {c.fp32_bytes / GB:.3f} | {c.bytes / GB:.3f} | {fr} |")
    compressed = sum(c.bytes for c in compression.values())
    total_fp32 = report["fp32_bytes"]
    print(f"\nembedding bytes: {total_fp32 / GB:.1f} → {compressed / GB:.1f} GiB "
          f"({compressed / total_fp32:.1%} of fp32 kept); planned in {report['planning_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _print_placement(title: str, p: Dict[str, object]) -> None:
    print(f"\n{title}:")
    for rank, d in enumerate(p["devices"]):
        print(f"  device {rank}: HBM {d['hbm'] / GB:.2f} GiB, DDR {d['ddr'] / GB:.2f} GiB")
    by_rank: Dict[str, List[str]] = {}
    for name, t in p["tables"].items():
        by_rank.setdefault(",".join(map(str, t["ranks"])), []).append(f"{name} ({t['sharding_type']})")
    for ranks, names in sorted(by_rank.items()):
        print(f"  ranks {ranks}: {len(names)} tables: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shark-torchrec", description="SHARK for TorchRec")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="plan a model for a topology, before and after compression")
    src = plan.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["criteo1tb"], help="TorchRec's DLRM example for Criteo 1TB")
    src.add_argument("--tables", type=existing_file, help="YAML/JSON: tables: [{name, rows, dim, features}]")
    plan.add_argument("--dim", type=positive_int, default=128, help="embedding dim of the preset")
    plan.add_argument("--world_size", type=positive_int, default=1)
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    plan.add_argument("--hbm_gb", type=positive_float, default=80.0, help="GiB of device memory per GPU")
    plan.add_argument("--ddr_gb", type=positive_float, help="GiB of host memory per device (CPU topologies)")
    plan.add_argument("--batch_size", type=positive_int, default=512)
    plan.add_argument("--zipf", type=nonnegative_float, default=1.05,
                      help="assumed id popularity law when no row priorities are given")
    plan.add_argument("--planner_overrides", type=existing_file,
                      help="YAML with per-table compression settings (pin, exclude, tiers, budget_bytes)")
    plan.add_argument("--row_alignment", choices=["auto", "16", "1"], default="auto",
                      help="bytes each compressed row is padded to: auto (default) is 16 for cuda, "
                      "1 for cpu (FBGEMM's CPU layout)")
    plan.add_argument("--max_drop_fraction", type=closed_fraction, default=0.5,
                      help="refuse a fit that drops more than this fraction of any table's rows "
                      "(dropped rows read as zeros; default 0.5)")
    plan.add_argument("--json", type=output_file, help="also write the report as JSON")
    # SUPPRESS: a subcommand's default would overwrite `shark-torchrec --debug plan ...`.
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    plan.set_defaults(func=plan_command)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``shark-torchrec``; returns the exit status.  Bad input (files, flags) is one line
    on stderr and status 1; ``--debug`` shows its traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SharkInputError as e:
        if args.debug:
            raise
        report_input_error(e, prog="shark-torchrec")
        return 1


if __name__ == "__main__":
    sys.exit(main())
