"""Exporting a compressed DLRM for serving, and loading it back safely.

An export is one file, written with ``torch.save`` and read with ``torch.load(weights_only=True)``
(plain tensors and containers, plus TorchRec's packed 4-/2-bit tensor types; no other pickled
object).  It holds everything serving needs and nothing from training: the model's shape
(DLRM or DLRM_DCN, dense and over-arch sizes), the row-wise mixed collection's layout (tables,
tiers, rows per tier, groups), all weights (quantized rows, id maps, dense layers), the pruning
plan that produced it (if any) and free-form metadata.  :func:`load_export` rebuilds the model
from the file alone and refuses, with an :class:`ExportError` naming the file, files that are
not exports, truncated files, exports whose fields are malformed (naming the field; checked
before any model is built) and exports of a different model than the caller expects (naming
what differs).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from shark_torchrec.errors import SharkInputError
from shark_torchrec.pruning.mean_fill import MeanFilledSparseArch, stand_in_collection
from shark_torchrec.quant.mixed_ebc import MixedLayout, RowwiseMixedEmbeddingBagCollection
from shark_torchrec.quant.tiers import Tier

EXPORT_FORMAT = "shark-torchrec/export/v1"
_MODEL_KINDS = ("dlrm", "dlrm_dcn")


class ExportError(SharkInputError, ValueError):
    """A file that cannot be loaded as a shark-torchrec export (the message names the file,
    the field and what is wrong)."""


def _linears(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def describe_dlrm(dlrm: DLRM) -> Dict[str, Any]:
    """The shape of a TorchRec DLRM/DLRM_DCN besides its collection (kind, dense and over-arch
    sizes, DCN layers): what :func:`build_dlrm` needs to build it again."""
    dense, over = _linears(dlrm.dense_arch), _linears(dlrm.over_arch)
    desc = {
        "kind": "dlrm_dcn" if isinstance(dlrm, DLRM_DCN) else "dlrm",
        "dense_in_features": dense[0].in_features,
        "dense_arch_layer_sizes": [m.out_features for m in dense],
        "over_arch_layer_sizes": [m.out_features for m in over],
    }
    if isinstance(dlrm, DLRM_DCN):
        cross = dlrm.inter_arch.crossnet
        desc["dcn_num_layers"] = len(cross.V_kernels)
        desc["dcn_low_rank_dim"] = cross.V_kernels[0].shape[0]
    if isinstance(dlrm.sparse_arch, MeanFilledSparseArch):
        # fields pruned by mean replacement: their constants are in the state dict
        desc["interaction_features"] = list(dlrm.sparse_arch.sparse_feature_names)
    return desc


def _describe(dlrm: DLRM) -> Dict[str, Any]:
    ebc = dlrm.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, RowwiseMixedEmbeddingBagCollection):
        raise TypeError("export expects a DLRM whose collection went through quantize_ "
                        f"(got {type(ebc).__name__})")
    return {**describe_dlrm(dlrm), "embedding": ebc.layout.to_dict()}


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


def _build(desc: Dict[str, Any], layout: MixedLayout) -> DLRM:
    return build_dlrm(desc, RowwiseMixedEmbeddingBagCollection(layout))


def build_dlrm(desc: Dict[str, Any], ebc: nn.Module) -> DLRM:
    """A DLRM/DLRM_DCN of the shape :func:`describe_dlrm` gave, over the collection ``ebc``
    (dense weights freshly initialised; the constants of fields pruned by mean replacement
    zero until the state dict is loaded)."""
    fields = desc.get("interaction_features")
    if fields:
        dim = ebc.embedding_bag_configs()[0].embedding_dim
        model = _build_dlrm(desc, stand_in_collection(fields, dim))
        model.sparse_arch = MeanFilledSparseArch(ebc, fields)
        return model
    return _build_dlrm(desc, ebc)


def _build_dlrm(desc: Dict[str, Any], ebc: nn.Module) -> DLRM:
    common = dict(embedding_bag_collection=ebc, dense_in_features=desc["dense_in_features"],
                  dense_arch_layer_sizes=desc["dense_arch_layer_sizes"],
                  over_arch_layer_sizes=desc["over_arch_layer_sizes"])
    if desc["kind"] == "dlrm_dcn":
        return DLRM_DCN(dcn_num_layers=desc["dcn_num_layers"], dcn_low_rank_dim=desc["dcn_low_rank_dim"],
                        **common)
    return DLRM(**common)


def _json_field(path: str, payload: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """Field ``name`` of the payload: JSON text of an object."""
    text = payload[name]
    if not isinstance(text, str):
        raise ExportError(f"{path}: field {name!r} must be JSON text, got {type(text).__name__}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: field {name!r} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ExportError(f"{path}: field {name!r} must be a JSON object, got {type(value).__name__}")
    return value


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _check_description(path: str, desc: Dict[str, Any]) -> MixedLayout:
    """Check the ``model`` field's description (everything :func:`_build` reads) and return
    its collection layout; raises :class:`ExportError` naming the key."""
    check_model_shape(path, desc, extra=["embedding"])
    try:
        layout = MixedLayout.from_dict(desc["embedding"])
        layout.configs()  # every table entry complete and well-typed
        for tier in layout.tiers:
            Tier.parse(tier)
        layout.check()  # rows per tier add up (SHARED rows replaced by their centroids)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path}: field 'model': embedding is not a valid row-wise mixed "
                          f"collection layout ({type(e).__name__}: {e})") from e
    return layout


def check_model_shape(path: str, desc: Dict[str, Any], extra: Sequence[str] = ()) -> None:
    """Check a :func:`describe_dlrm` description (everything :func:`build_dlrm` reads, and the
    keys ``extra``); raises :class:`ExportError` naming the key."""
    if not isinstance(desc, dict):
        raise ExportError(f"{path}: field 'model' must be an object, got {type(desc).__name__}")
    required = ["kind", "dense_in_features", "dense_arch_layer_sizes", "over_arch_layer_sizes", *extra]
    if desc.get("kind") == "dlrm_dcn":
        required += ["dcn_num_layers", "dcn_low_rank_dim"]
    missing = [k for k in required if k not in desc]
    if missing:
        raise ExportError(f"{path}: field 'model' lacks {missing}")
    if desc["kind"] not in _MODEL_KINDS:
        raise ExportError(f"{path}: field 'model': kind must be one of {list(_MODEL_KINDS)}, "
                          f"got {desc['kind']!r}")
    for key in ("dense_in_features", "dcn_num_layers", "dcn_low_rank_dim"):
        if key in required and not _is_positive_int(desc[key]):
            raise ExportError(f"{path}: field 'model': {key} must be an integer >= 1, got {desc[key]!r}")
    for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
        sizes = desc[key]
        if not isinstance(sizes, list) or not sizes or not all(map(_is_positive_int, sizes)):
            raise ExportError(f"{path}: field 'model': {key} must be a non-empty list of integers "
                              f">= 1, got {sizes!r}")
    fields = desc.get("interaction_features")
    if fields is not None and (not isinstance(fields, list) or not fields or len(set(map(str, fields))) != len(fields)
                               or not all(isinstance(f, str) for f in fields)):
        raise ExportError(f"{path}: field 'model': interaction_features must be a non-empty list of distinct "
                          f"field names, got {fields!r}")


def _check_state_dict(path: str, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ExportError(f"{path}: field 'state_dict' must be a mapping of names to tensors, "
                          f"got {type(state).__name__}")
    # A module's ``_extra_state`` (the mixed collection's layout) is the one non-tensor entry.
    bad: List[str] = [str(k) for k, v in state.items() if not isinstance(k, str) or not (
        isinstance(v, torch.Tensor) or k.endswith("._extra_state"))]
    if bad:
        raise ExportError(f"{path}: field 'state_dict' holds entries that are not named tensors: {bad[:5]}")
    for k, v in state.items():  # a NaN weight would make every prediction NaN, silently
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ExportError(f"{path}: field 'state_dict': weight {k!r} is not finite (NaN or Inf)")


def check_pruning_plan(path: str, text: Any) -> None:
    """An export's ``pruning_plan``: ``""`` (none) or the JSON text of a plan object."""
    if not isinstance(text, str):
        raise ExportError(f"{path}: field 'pruning_plan' must be JSON text or empty, got {type(text).__name__}")
    if text:
        _json_field(path, {"pruning_plan": text}, "pruning_plan")


def _check_expected(path: str, features: List[str], dense_in: int, expect_features: Optional[Sequence[str]],
                    expect_dense_in_features: Optional[int]) -> None:
    if expect_features is not None and list(expect_features) != features:
        raise ExportError(f"{path}: exported model reads features {features}, expected "
                          f"{list(expect_features)}")
    if expect_dense_in_features is not None and expect_dense_in_features != dense_in:
        raise ExportError(f"{path}: exported model takes {dense_in} dense inputs, "
                          f"expected {expect_dense_in_features}")


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

    A sharded export (a directory, :mod:`shark_torchrec.sharded.export`) loads onto the
    processes that call this (a collective under ``torch.distributed``; one plain process
    loads it whole): the model then serves sharded.
    """
    from shark_torchrec.sharded.export import is_sharded_export, load_sharded_export

    if is_sharded_export(path):
        model, info = load_sharded_export(path)
        collection = model.model.sparse_arch.embedding_bag_collection
        features = [f for c in collection.embedding_bag_configs() for f in c.feature_names]
        _check_expected(path, features, info["model"]["dense_in_features"], expect_features,
                        expect_dense_in_features)
        return model, info
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
    # Every field is checked before any model is built: a damaged or hand-edited file gets an
    # error naming the field, not a KeyError from deep inside the model's constructor.
    desc = _json_field(path, payload, "model")
    layout = _check_description(path, desc)
    metadata = _json_field(path, payload, "metadata")
    check_pruning_plan(path, payload["pruning_plan"])
    _check_state_dict(path, payload["state_dict"])
    features = [f for c in layout.configs() for f in c.feature_names]
    _check_expected(path, features, desc["dense_in_features"], expect_features, expect_dense_in_features)
    try:
        model = _build(desc, layout)
    except (KeyError, TypeError, ValueError) as e:  # e.g. groups that do not cover the tables
        raise ExportError(f"{path}: field 'model' describes no buildable model "
                          f"({type(e).__name__}: {e})") from e
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"{path}: weights do not match the exported model description: {e}") from e
    wrapped = DLRMTrain(model)
    wrapped.eval()
    return wrapped, {"model": desc, "pruning_plan": payload["pruning_plan"], "metadata": metadata}
