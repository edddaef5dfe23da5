"""Applying a pruning plan to a model.

* :func:`prune_embedding_collection` — a new ``EmbeddingBagCollection`` without the dropped
  tables (and without dropped features on shared tables); surviving weights copied unchanged.
* :func:`prune_dlrm` — TorchRec's ``DLRM`` / ``DLRM_DCN`` (or ``DLRMTrain`` around one) without
  the dropped fields' tables.  Given each dropped field's mean pooled embedding (``means``),
  the fields read those constants and everything else stays as it was
  (:mod:`~shark_torchrec.pruning.mean_fill`: lossless for a constant field).  Without, the
  model is rebuilt for the smaller field set: the interaction and the over-arch's first layer
  shrink, and every weight that still applies is carried over (the over-arch columns of
  surviving feature interactions; for DCN, the cross-net rows/columns of surviving feature
  blocks).
* :class:`ZeroFilledEmbeddingBagCollection` / :func:`prune_model` — for any other model: the
  collection is replaced by one that keeps the original output layout, dropped features
  reading as zeros, so the model runs unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shark_torchrec.pruning.mean_fill import MeanFilledSparseArch
from shark_torchrec.pruning.plan import PruningPlan


def pruned_tables(tables: Sequence[EmbeddingBagConfig], plan: PruningPlan) -> List[EmbeddingBagConfig]:
    """The table configs that survive ``plan``, dropped features removed from shared tables."""
    plan.validate(tables)
    dropped = set(plan.dropped_features)
    out = []
    for t in tables:
        feats = [f for f in t.feature_names if f not in dropped]
        if feats:
            out.append(dataclasses.replace(t, feature_names=feats))
    return out


@torch.no_grad()
def prune_embedding_collection(ebc: EmbeddingBagCollection, plan: PruningPlan) -> EmbeddingBagCollection:
    """A new collection holding only the tables ``plan`` keeps; weights copied unchanged.

    A collection on the meta device gives one on the meta device (nothing to copy)."""
    tables = pruned_tables(ebc.embedding_bag_configs(), plan)
    device = next(iter(ebc.parameters())).device
    new = EmbeddingBagCollection(tables=tables, is_weighted=ebc.is_weighted(), device=device)
    if device.type != "meta":
        for t in tables:
            new.embedding_bags[t.name].weight.copy_(ebc.embedding_bags[t.name].weight)
    return new


def _mean_filled(model: DLRM, plan: PruningPlan, means: Mapping[str, torch.Tensor]) -> DLRM:
    """``model`` whose dropped fields read ``means`` (see :func:`prune_dlrm`)."""
    old = model.sparse_arch
    dropped = list(plan.dropped_features)
    missing = [f for f in dropped if f not in means]
    if missing:
        raise ValueError(f"prune_dlrm: no mean given for the dropped fields {missing}")
    constants = old.means() if isinstance(old, MeanFilledSparseArch) else {}
    constants.update({f: means[f] for f in dropped})
    new_ebc = prune_embedding_collection(old.embedding_bag_collection, plan)
    # Every dense module copied; the old sparse arch (and its tables) not.
    new = copy.deepcopy(model, memo={id(old): None})
    new.sparse_arch = MeanFilledSparseArch(new_ebc, old.sparse_feature_names, constants,
                                           device=_linears(model.dense_arch)[0].weight.device)
    return new


def _linears(module: nn.Module) -> List[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _kept_index(old_features: List[str], kept: List[str]) -> List[int]:
    """Positions in the combined [dense, f_1..f_F] layout (dense = 0) of the kept vectors."""
    return [0] + [old_features.index(f) + 1 for f in kept]


@torch.no_grad()
def prune_dlrm(model: Union[DLRM, DLRM_DCN, DLRMTrain], plan: PruningPlan,
               means: Optional[Mapping[str, torch.Tensor]] = None) -> Union[DLRM, DLRM_DCN, DLRMTrain]:
    """TorchRec's DLRM (or DLRM_DCN, or a ``DLRMTrain`` around one) without the tables of the
    fields ``plan`` drops (a new model; ``model`` is left as it was).

    Args:
        means: each dropped field's constant, ``{field: [D]}`` (its mean pooled embedding,
            :func:`~shark_torchrec.pruning.mean_fill.field_means`): the fields stay in the
            interaction reading those, and every dense weight is kept.  Without it, the model
            is rebuilt without the fields, every weight that still applies carried over.
    """
    if isinstance(model, DLRMTrain):
        return DLRMTrain(prune_dlrm(model.model, plan, means))
    if not isinstance(model, DLRM):
        raise TypeError(f"prune_dlrm expects TorchRec's DLRM/DLRM_DCN/DLRMTrain, got {type(model).__name__}")
    if means is not None and (plan.dropped_features or isinstance(model.sparse_arch, MeanFilledSparseArch)):
        return _mean_filled(model, plan, means)
    if isinstance(model.sparse_arch, MeanFilledSparseArch):
        raise ValueError(f"prune_dlrm: fields {model.sparse_arch.pruned_features} of this model already read "
                         "their means; prune it further with means too")
    old_ebc = model.sparse_arch.embedding_bag_collection
    old_features = list(model.sparse_arch.sparse_feature_names)
    new_ebc = prune_embedding_collection(old_ebc, plan)
    kept = [f for f in old_features if f not in set(plan.dropped_features)]
    D = model.sparse_arch.D
    dense_lin = _linears(model.dense_arch)
    over_lin = _linears(model.over_arch)
    dense_device = dense_lin[0].weight.device
    common = dict(
        embedding_bag_collection=new_ebc,
        dense_in_features=dense_lin[0].in_features,
        dense_arch_layer_sizes=[m.out_features for m in dense_lin],
        over_arch_layer_sizes=[m.out_features for m in over_lin],
        dense_device=dense_device,
    )
    idx = _kept_index(old_features, kept)
    if isinstance(model, DLRM_DCN):
        cross = model.inter_arch.crossnet
        new = DLRM_DCN(dcn_num_layers=len(cross.V_kernels), dcn_low_rank_dim=cross.V_kernels[0].shape[0], **common)
        cols = torch.cat([torch.arange(i * D, (i + 1) * D) for i in idx]).to(dense_device)
        new_cross = new.inter_arch.crossnet
        for layer in range(len(cross.V_kernels)):
            new_cross.V_kernels[layer].copy_(cross.V_kernels[layer][:, cols])
            new_cross.W_kernels[layer].copy_(cross.W_kernels[layer][cols, :])
            new_cross.bias[layer].copy_(cross.bias[layer][cols])
        over_cols = cols
    else:
        new = DLRM(**common)
        F_old = len(old_features)
        old_pairs = torch.triu_indices(F_old + 1, F_old + 1, offset=1).t().tolist()
        pair_col = {tuple(p): D + i for i, p in enumerate(old_pairs)}
        new_pairs = torch.triu_indices(len(kept) + 1, len(kept) + 1, offset=1).t().tolist()
        over_cols = torch.tensor(
            list(range(D)) + [pair_col[(idx[a], idx[b])] for a, b in new_pairs], device=dense_device
        )
    new.dense_arch.load_state_dict(model.dense_arch.state_dict())
    new_over = _linears(new.over_arch)
    new_over[0].weight.copy_(over_lin[0].weight[:, over_cols])
    new_over[0].bias.copy_(over_lin[0].bias)
    for old_l, new_l in zip(over_lin[1:], new_over[1:]):
        new_l.load_state_dict(old_l.state_dict())
    return new


class ZeroFilledEmbeddingBagCollection(nn.Module):
    """A pruned collection that answers with the original layout: every original feature in
    the output ``KeyedTensor``, in the original order and dims, dropped ones as zeros.

    Args:
        pruned: the collection holding the surviving tables.
        original_tables: the tables of the collection it replaces.
    """

    def __init__(self, pruned: EmbeddingBagCollection, original_tables: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.pruned = pruned
        self._keys = [f for t in original_tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in original_tables for _ in t.feature_names]
        self._original_tables = list(original_tables)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.pruned.embedding_bag_configs()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.pruned(features)
        have = kt.to_dict()
        B = kt.values().shape[0]
        like = kt.values()
        parts = [have[k] if k in have else like.new_zeros(B, d) for k, d in zip(self._keys, self._dims)]
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=torch.cat(parts, dim=1))


def prune_model(model: nn.Module, plan: PruningPlan, mode: str = "auto") -> nn.Module:
    """Apply ``plan`` to a model.

    Args:
        mode: ``"rebuild"`` (TorchRec DLRM / DLRM_DCN / DLRMTrain only: a smaller model),
            ``"zeros"`` (any model: each ``EmbeddingBagCollection`` is swapped, in place, for a
            :class:`ZeroFilledEmbeddingBagCollection`), or ``"auto"`` (rebuild when possible).

    Returns the pruned model (a new one for ``rebuild``; ``model`` itself for ``zeros``).
    """
    if mode not in ("auto", "rebuild", "zeros"):
        raise ValueError(f"mode must be auto, rebuild or zeros, got {mode!r}")
    if mode in ("auto", "rebuild") and isinstance(model, (DLRM, DLRMTrain)):
        return prune_dlrm(model, plan)
    if mode == "rebuild":
        raise TypeError(f"mode='rebuild' supports TorchRec's DLRM models, not {type(model).__name__}")
    ebcs = [(n, m) for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if not ebcs:
        raise ValueError("the model holds no (plain) EmbeddingBagCollection to prune")
    all_tables = [t for _, m in ebcs for t in m.embedding_bag_configs()]
    plan.validate(all_tables)
    for name, ebc in ebcs:
        sub = _sub_plan(plan, ebc.embedding_bag_configs())
        wrapper = ZeroFilledEmbeddingBagCollection(prune_embedding_collection(ebc, sub), ebc.embedding_bag_configs())
        if name == "":
            return wrapper
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, wrapper)
    return model


def _sub_plan(plan: PruningPlan, tables: Sequence[EmbeddingBagConfig]) -> PruningPlan:
    """The part of a plan that concerns one collection's tables."""
    names = {t.name for t in tables}
    feats = {f for t in tables for f in t.feature_names}
    return PruningPlan(
        tables={t: fs for t, fs in plan.tables.items() if t in names},
        table_bytes={t: b for t, b in plan.table_bytes.items() if t in names},
        dropped_features=[f for f in plan.dropped_features if f in feats],
        method=plan.method,
    )
