"""Building TorchRec's DLRM / DLRM_DCN over an ``EmbeddingBagCollection``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import PoolingType

from shark_torchrec.pruning.mean_fill import MeanFilledSparseArch, stand_in_collection

#: Module path of the embedding collection inside ``DLRMTrain`` (the sharding-plan key).
EBC_FQN = "model.sparse_arch.embedding_bag_collection"


@dataclass(frozen=True)
class DLRMConfig:
    """Shape of a DLRM.

    Attributes:
        feature_names: sparse features, one embedding table each (``t_<feature>``).
        num_embeddings_per_feature: rows of each feature's table.
        embedding_dim: dimension of every table (DLRM needs one dimension).
        dense_in_features: number of dense inputs.
        dense_arch_layer_sizes: dense MLP; its last size must equal ``embedding_dim``.
        over_arch_layer_sizes: over-arch MLP; its last size must be 1.
        interaction: ``"dot"`` (``DLRM``) or ``"dcn"`` (``DLRM_DCN``).
        dcn_num_layers, dcn_low_rank_dim: DCN settings.
        interaction_features: the fields the interaction reads, in its order, when some were
            pruned by mean replacement (:mod:`shark_torchrec.pruning.mean_fill`): those not
            among ``feature_names`` have no table and read a constant.  Empty (the default):
            ``feature_names``.
    """

    feature_names: Sequence[str]
    num_embeddings_per_feature: Sequence[int]
    embedding_dim: int = 16
    dense_in_features: int = 13
    dense_arch_layer_sizes: Sequence[int] = (64, 16)
    over_arch_layer_sizes: Sequence[int] = (64, 32, 1)
    interaction: str = "dot"
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16
    interaction_features: Sequence[str] = ()

    def __post_init__(self) -> None:
        if len(self.feature_names) != len(self.num_embeddings_per_feature):
            raise ValueError(
                f"DLRMConfig: {len(self.num_embeddings_per_feature)} num_embeddings values "
                f"for {len(self.feature_names)} features"
            )
        if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"DLRMConfig: dense_arch_layer_sizes[-1] ({self.dense_arch_layer_sizes[-1]}) "
                f"must equal embedding_dim ({self.embedding_dim})"
            )
        if self.over_arch_layer_sizes[-1] != 1:
            raise ValueError("DLRMConfig: over_arch_layer_sizes must end with 1")
        if self.interaction not in ("dot", "dcn"):
            raise ValueError(f"DLRMConfig.interaction must be dot or dcn, got {self.interaction!r}")
        if self.dense_in_features < 1:
            raise ValueError("DLRMConfig.dense_in_features must be >= 1")
        if self.interaction_features:
            names = list(self.interaction_features)
            outside = [f for f in self.feature_names if f not in names]
            if outside or len(set(names)) != len(names):
                raise ValueError(f"DLRMConfig.interaction_features {names} must name each field once and "
                                 f"include every feature_names field (missing {outside})")

    @property
    def mean_filled(self) -> List[str]:
        """Fields pruned by mean replacement: in the interaction, without a table."""
        return [f for f in self.interaction_features if f not in set(self.feature_names)]

    def tables(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=f"t_{f}",
                embedding_dim=self.embedding_dim,
                num_embeddings=int(n),
                feature_names=[f],
                pooling=PoolingType.SUM,
            )
            for f, n in zip(self.feature_names, self.num_embeddings_per_feature)
        ]


def build_dlrm_train(
    config: DLRMConfig,
    device: torch.device,
    seed: int,
    embedding_device: torch.device = torch.device("meta"),
) -> DLRMTrain:
    """A ``DLRMTrain`` whose dense layers are initialised from ``seed`` on ``device``,
    identically on every rank.  Its embedding tables are on ``embedding_device``: the meta
    device by default (DMP materialises the shards; see
    :func:`shark_torchrec.training.init.init_embedding_shards`), or a real device for an
    unsharded model."""
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=config.tables(), device=embedding_device)
    model = build_dlrm_over(ebc, config, device)
    return DLRMTrain(model)


def build_dlrm_over(ebc: nn.Module, config: DLRMConfig, device: torch.device) -> DLRM:
    """TorchRec's DLRM / DLRM_DCN of ``config``'s shape over the collection ``ebc``, its dense
    layers initialised on ``device`` from the current RNG state.  With
    ``config.interaction_features``, the interaction spans those fields, the ones without a
    table reading constants (:class:`~shark_torchrec.pruning.mean_fill.MeanFilledSparseArch`,
    zeros until a state dict is loaded)."""
    if config.mean_filled:
        # DLRM sizes its interaction from its collection's fields: build it over a meta
        # stand-in serving every field (no memory, no RNG draw), then put the real one in.
        model = _dlrm(stand_in_collection(config.interaction_features, config.embedding_dim), config, device)
        model.sparse_arch = MeanFilledSparseArch(ebc, config.interaction_features, device=device)
        return model
    return _dlrm(ebc, config, device)


def _dlrm(ebc: nn.Module, config: DLRMConfig, device: torch.device) -> DLRM:
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=config.dense_in_features,
        dense_arch_layer_sizes=list(config.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(config.over_arch_layer_sizes),
        dense_device=device,
    )
    if config.interaction == "dcn":
        model = DLRM_DCN(
            dcn_num_layers=config.dcn_num_layers,
            dcn_low_rank_dim=config.dcn_low_rank_dim,
            **common,
        )
    else:
        model = DLRM(**common)
    return model
