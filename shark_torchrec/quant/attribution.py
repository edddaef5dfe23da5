"""Which tier, which table: where a row-wise mixed model loses its quality.

A quantized collection reads each row as :func:`~shark_torchrec.quant.rows.dequantize_rows`
of its fp32 weights in the row's tier, so the quantized model is exactly the float model with
those rows substituted.  Restoring one group of rows (a tier, a table) to fp32 in that
simulation and evaluating again tells how much quality that group's quantization costs: the
question to answer before changing the tier assignment.

    report = attribute_quantization_loss(float_model, assignment.tiers, evaluate)

``evaluate(model)`` returns the model's logits on fixed evaluation rows; the AUC differences
are paired on those rows (:class:`~shark_torchrec.evaluation.PairedBootstrap`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shark_torchrec.evaluation import PairedBootstrap
from shark_torchrec.quant.rows import dequantize_rows
from shark_torchrec.quant.shared_rows import SharedRows
from shark_torchrec.quant.tiers import TIER_ORDER, Tier, check_row_fit

__all__ = ["attribute_quantization_loss", "attribution_report", "simulated_tiers"]


def _collection(model: nn.Module) -> EmbeddingBagCollection:
    found = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    if len(found) != 1:
        raise ValueError(f"expected one EmbeddingBagCollection in the model, found {len(found)}")
    return found[0]


def _read_as_stored(ebc: EmbeddingBagCollection, tiers: Dict[str, torch.Tensor],
                    row_fit: str = "minmax", shared: Optional[Dict[str, SharedRows]] = None) -> Dict[str, torch.Tensor]:
    """Per table, its weights as every row reads in its tier (FP32 rows unchanged), integer
    rows stored with ``row_fit`` (the assignment's: :attr:`TierAssignment.row_fit`), SHARED
    rows as their centroid (``shared[table]``: :attr:`TierAssignment.shared`)."""
    unknown = sorted(set(tiers) - set(ebc.embedding_bags))
    if unknown:
        raise KeyError(f"tiers given for tables the model does not have: {unknown}")
    out = {}
    for name, t in tiers.items():
        w = ebc.embedding_bags[name].weight.detach()
        if t.numel() != w.shape[0]:
            raise ValueError(f"table {name!r}: {t.numel()} tiers for {w.shape[0]} rows")
        t = t.long().cpu().reshape(-1)
        bad = (t < 0) | (t >= len(TIER_ORDER))
        if bool(bad.any()):  # (such a row matched no tier and read as fp32)
            row = int(bad.nonzero()[0])
            raise ValueError(f"table {name!r}: row {row} has tier index {int(t[row])}, not one of TIER_ORDER "
                             f"(0..{len(TIER_ORDER) - 1})")
        sim = w.clone()
        for i, tier in enumerate(TIER_ORDER):
            rows = t == i
            if tier is Tier.FP32 or not bool(rows.any()):
                continue
            if tier is Tier.SHARED:
                sim[rows] = _centroid_reads(name, rows, shared, w.shape).to(sim.dtype)
            else:
                sim[rows] = dequantize_rows(w[rows], tier, "cpu", row_fit).to(sim.dtype)
        out[name] = sim
    return out


def _centroid_reads(name: str, rows: torch.Tensor, shared: Optional[Dict[str, SharedRows]],
                    shape: torch.Size) -> torch.Tensor:
    """The centroids the SHARED ``rows`` (a mask) of table ``name`` read."""
    s = None if shared is None else shared.get(name)
    if s is None:
        raise ValueError(f"table {name!r} has SHARED rows: pass the assignment's centroids "
                         "(shared=assignment.shared)")
    if s.rows is not None or s.index.numel() != shape[0] or tuple(s.centroids.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"table {name!r}: its centroids cover {s.index.numel()} rows of dim "
                         f"{tuple(s.centroids.shape[1:])}, the table has {shape[0]} of dim {tuple(shape[1:])}")
    index = s.index.long()[rows]
    if bool(((index < 0) | (index >= s.k)).any()):
        raise ValueError(f"table {name!r}: a SHARED row's centroid index is outside 0..{s.k - 1}")
    return s.centroids[index]


@contextlib.contextmanager
def _substituted(ebc: EmbeddingBagCollection, stored: Dict[str, torch.Tensor],
                 keep_fp32: Optional[Dict[str, torch.Tensor]]) -> Iterator[None]:
    """Within the block the tables read ``stored``, except the rows ``keep_fp32`` marks."""
    saved = {}
    try:
        with torch.no_grad():
            for name, sim in stored.items():
                w = ebc.embedding_bags[name].weight
                saved[name] = w.detach().clone()
                w.copy_(sim)
                if keep_fp32 is not None and name in keep_fp32:
                    mask = keep_fp32[name].bool().cpu()
                    w[mask] = saved[name][mask]
        yield
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                ebc.embedding_bags[name].weight.copy_(w0)


@contextlib.contextmanager
def simulated_tiers(model: nn.Module, tiers: Dict[str, torch.Tensor],
                    keep_fp32: Optional[Dict[str, torch.Tensor]] = None, row_fit: str = "minmax",
                    shared: Optional[Dict[str, SharedRows]] = None) -> Iterator[nn.Module]:
    """Within the block, every row of the float ``model``'s collection reads as it would in
    its tier (``tiers[table][row]``, a :data:`TIER_ORDER` index; integer rows stored with
    ``row_fit``, the assignment's; SHARED rows as their centroid in ``shared``, the
    assignment's), except the rows that ``keep_fp32[table]`` (a boolean mask) marks; the fp32
    weights come back afterwards."""
    check_row_fit(row_fit)
    ebc = _collection(model)
    with _substituted(ebc, _read_as_stored(ebc, tiers, row_fit, shared), keep_fp32):
        yield model


def attribute_quantization_loss(
    model: nn.Module,
    tiers: Dict[str, torch.Tensor],
    evaluate: Callable[[nn.Module], torch.Tensor],
    labels: torch.Tensor,
    tables: Optional[Sequence[str]] = None,
    bootstrap: int = 1000,
    seed: int = 0,
    row_fit: str = "minmax",
    shared: Optional[Dict[str, SharedRows]] = None,
) -> Dict[str, object]:
    """The AUC each group of rows gives back when it alone stays in fp32 (integer rows stored
    with ``row_fit``: pass the assignment's, :attr:`TierAssignment.row_fit`; SHARED rows read
    their centroid in ``shared``: pass :attr:`TierAssignment.shared`).

    ``model`` is the float model before quantization (its weights are restored on return),
    ``tiers`` the assignment (:attr:`TierAssignment.tiers`), ``evaluate(model)`` the logits on
    fixed rows whose ``labels`` are given.  Returns ``{"auc": {"fp32", "quantized"}, "fp32":
    {...}, "tiers": {tier: {...}}, "tables": {table: {...}}}``; each entry holds ``rows`` and
    the AUC gained over the fully quantized model when those rows stay fp32 (``recovered``,
    with its 95% paired bootstrap ``ci``); ``"fp32"`` is all rows.
    A tier's entry covers its rows in every table; ``tables`` (default all) each keep all
    their rows in fp32.
    """
    check_row_fit(row_fit)
    ebc = _collection(model)
    with torch.no_grad():
        stored = _read_as_stored(ebc, tiers, row_fit, shared)  # dequantized once, reused by every group
        logits = {"fp32": evaluate(model)}
        with _substituted(ebc, stored, None):
            logits["quantized"] = evaluate(model)
        groups: Dict[str, Dict[str, torch.Tensor]] = {}
        for i, tier in enumerate(TIER_ORDER):
            if tier is Tier.FP32:
                continue
            masks = {n: t.long().cpu() == i for n, t in tiers.items()}
            if sum(int(m.sum()) for m in masks.values()):
                groups[f"tier:{tier.value}"] = masks
        for name in (tables if tables is not None else sorted(tiers)):
            groups[f"table:{name}"] = {name: torch.ones(tiers[name].numel(), dtype=torch.bool)}
        for key, masks in groups.items():
            with _substituted(ebc, stored, masks):
                logits[key] = evaluate(model)
    rows = {key: sum(int(m.sum()) for m in masks.values()) for key, masks in groups.items()}
    rows["fp32"] = sum(t.numel() for t in tiers.values())
    return attribution_report(logits, labels, rows, bootstrap, seed)


def attribution_report(logits: Dict[str, torch.Tensor], labels: torch.Tensor, rows: Dict[str, int],
                       bootstrap: int = 1000, seed: int = 0) -> Dict[str, object]:
    """The report of :func:`attribute_quantization_loss` from the logits of every variant:
    ``"fp32"``, ``"quantized"`` and one per group (``"tier:<tier>"``, ``"table:<table>"``: that
    group's rows kept fp32), on the rows whose ``labels`` are given; ``rows`` counts each
    group's rows (and ``"fp32"`` all of them).  Shared by the float-model simulation and the
    sharded pipeline, which converts the model again for each group."""
    boot = PairedBootstrap(np.asarray(labels, dtype=np.float64),
                           {k: np.asarray(v, dtype=np.float64) for k, v in logits.items()},
                           bootstrap=bootstrap, seed=seed)
    total = boot.compare("quantized", "fp32")
    out: Dict[str, object] = {
        "auc": {"fp32": total.auc, "quantized": total.auc_reference},
        "fp32": {"rows": rows["fp32"], "recovered": total.delta_auc, "ci": total.delta_auc_ci},
        "tiers": {}, "tables": {},
    }
    for key in logits:
        if ":" not in key:
            continue
        c = boot.compare("quantized", key)
        kind, name = key.split(":", 1)
        out[kind + "s"][name] = {"rows": rows[key], "recovered": c.delta_auc, "ci": c.delta_auc_ci}
    return out
