"""Exporting a compressed DLRM for serving, and loading it back safely.

An export is one file, written with ``torch.save`` and read with ``torch.load(weights_only=True)``
(plain tensors and containers, plus TorchRec's packed 4-/2-bit tensor types; no other pickled
object).  It holds everything serving needs and nothing from training: the model's shape
(DLRM or DLRM_DCN, dense and over-arch sizes), the row-wise mixed collection's layout (tables,
tiers, rows per tier, groups), all weights (quantized rows, id maps, dense layers), the pruning
plan that produced it (if any) and free-form metadata.  :func:`load_export` rebuilds the model
from the file alone and refuses files that are not exports, truncated files, and exports of a
different model than the caller expects (naming what differs).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from shark_torchrec.quant.mixed_ebc import MixedLayout, RowwiseMixedEmbeddingBagCollection

EXPORT_FORMAT = "shark-torchrec/export/v1"


class ExportError(ValueError):
    """A file that cannot be loaded as a shark-torchrec export (the message says why)."""


def _linears(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _describe(dlrm: DLRM) -> Dict[str, Any]:
    ebc = dlrm.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, RowwiseMixedEmbeddingBagCollection):
        raise TypeError("export expects a DLRM whose collection went through quantize_ "
                        f"(got {type(ebc).__name__})")
    dense, over = _linears(dlrm.dense_arch), _linears(dlrm.over_arch)
    desc = {
        "kind": "dlrm_dcn" if isinstance(dlrm, DLRM_DCN) else "dlrm",
        "dense_in_features": dense[0].in_features,
        "dense_arch_layer_sizes": [m.out_features for m in dense],
        "over_arch_layer_sizes": [m.out_features for m in over],
        "embedding": ebc.layout.to_dict(),
    }
    if isinstance(dlrm, DLRM_DCN):
        cross = dlrm.inter_arch.crossnet
        desc["dcn_num_layers"] = len(cross.V_kernels)
        desc["dcn_low_rank_dim"] = cross.V_kernels[0].shape[0]
    return desc


def export_model(
    model: Union[DLRM, DLRMTrain],
    path: str,
    pruning_plan: Optional[Any] = None,
    metadata: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``model`` (a TorchRec DLRM/DLRM_DCN, or ``DLRMTrain`` around one, whose collection
    is a :class:`RowwiseMixedEmbeddingBagCollection`) to ``path``.

    Args:
        pruning_plan: the :class:`~shark_torchrec.pruning.PruningPlan` that produced the model.
        metadata: JSON-serialisable extras (metrics, data description, ...).
    """
    dlrm = model.model if isinstance(model, DLRMTrain) else model
    desc = _describe(dlrm)
    payload = {
        "format": EXPORT_FORMAT,
        "model": json.dumps(desc),
        "pruning_plan": pruning_plan.to_json() if pruning_plan is not None else "",
        "metadata": json.dumps(metadata or {}),
        "state_dict": dlrm.state_dict(),
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written export under the final name


def _build(desc: Dict[str, Any]) -> DLRM:
    layout = MixedLayout.from_dict(desc["embedding"])
    ebc = RowwiseMixedEmbeddingBagCollection(layout)
    common = dict(embedding_bag_collection=ebc, dense_in_features=desc["dense_in_features"],
                  dense_arch_layer_sizes=desc["dense_arch_layer_sizes"],
                  over_arch_layer_sizes=desc["over_arch_layer_sizes"])
    if desc["kind"] == "dlrm_dcn":
        return DLRM_DCN(dcn_num_layers=desc["dcn_num_layers"], dcn_low_rank_dim=desc["dcn_low_rank_dim"],
                        **common)
    if desc["kind"] != "dlrm":
        raise ExportError(f"unknown model kind {desc['kind']!r}")
    return DLRM(**common)


def load_export(
    path: str,
    expect_features: Optional[Sequence[str]] = None,
    expect_dense_in_features: Optional[int] = None,
) -> Tuple[DLRMTrain, Dict[str, Any]]:
    """Rebuild an exported model for serving (CPU, eval mode).

    Args:
        path: the export.
        expect_features, expect_dense_in_features: what the serving side feeds; an export of a
            model with other inputs is refused, naming the difference.

    Returns ``(DLRMTrain around the model, info)`` where ``info`` has ``model`` (the
    description), ``pruning_plan`` (JSON text or ``""``) and ``metadata``.
    """
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, ...
            raise ExportError(f"{path}: not a readable shark-torchrec export "
                              f"(truncated or another kind of file: {type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a shark-torchrec export (format must be {EXPORT_FORMAT!r})")
    missing = [k for k in ("model", "state_dict", "pruning_plan", "metadata") if k not in payload]
    if missing:
        raise ExportError(f"{path}: export lacks {missing}")
    desc = json.loads(payload["model"])
    features = [f for t in desc["embedding"]["tables"] for f in t["features"]]
    if expect_features is not None and list(expect_features) != features:
        raise ExportError(f"{path}: exported model reads features {features}, expected "
                          f"{list(expect_features)}")
    if expect_dense_in_features is not None and expect_dense_in_features != desc["dense_in_features"]:
        raise ExportError(f"{path}: exported model takes {desc['dense_in_features']} dense inputs, "
                          f"expected {expect_dense_in_features}")
    model = _build(desc)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"{path}: weights do not match the exported model description: {e}") from e
    wrapped = DLRMTrain(model)
    wrapped.eval()
    return wrapped, {"model": desc, "pruning_plan": payload["pruning_plan"],
                     "metadata": json.loads(payload["metadata"])}
