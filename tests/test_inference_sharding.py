"""Sharding row-wise mixed collections over 2 (CPU) devices for inference: the sharded model
returns exactly what the unsharded one does, and the planner's per-device storage equals the
bytes the sharded TBEs hold (within alignment and I/O buffers)."""

import copy
import dataclasses

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import PoolingType

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.planning.inference import (
    allocated_bytes_per_rank,
    planned_bytes_per_rank,
    shard_for_inference,
)
from shark_torchrec.quant import RowwiseMixedEmbeddingBagCollection, RowwiseQuantConfig, quantize_
from test_mixed_ebc import _batch, _setup


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("row_alignment", [16, 1])
def test_sharded_mixed_collection_equals_unsharded(pooling, groups, row_alignment) -> None:
    _, ebc, a = _setup(pooling, fractions={"fp32": .1, "fp16": .2, "int8": .3, "int4": .2, "int2": .1, "drop": .1})
    a = dataclasses.replace(a, row_alignment=row_alignment)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=groups)
    assert m.layout.row_alignment == row_alignment
    kjt = _batch()
    ref = m(kjt).values().clone()
    sharded, plan, planner = shard_for_inference(copy.deepcopy(m), world_size=2)
    ranks = {ps.ranks[0] for mp in plan.plan.values() for ps in mp.values()}
    assert ranks == {0, 1}  # really spread over both devices
    # The same rows and pooling; only the order in which tiers are added may differ.
    torch.testing.assert_close(sharded(kjt).values(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sharded(sharded.input_transform(kjt)).values(), ref, rtol=1e-6, atol=1e-7)
    held = allocated_bytes_per_rank(sharded, plan, 2)
    est = planned_bytes_per_rank(planner, 2)
    n_tables = sum(len(mp) for mp in plan.plan.values())
    for h, e in zip(held, est):
        # Estimate = the weights (FBGEMM row bytes) + per-table I/O buffers of a batch of 1;
        # allocation = the same rows, each sub-table padded to a 128-byte cache line.
        assert h > 0 and abs(e - h) <= n_tables * (128 + 1024)


def test_sharded_quantized_dlrm_predicts_the_same() -> None:
    torch.manual_seed(0)
    cfg = SyntheticConfig.default(num_fields=4, num_informative=2, cardinality=500, seed=1)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=500, feature_names=[f])
              for i, f in enumerate(cfg.feature_names)]
    model = DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
                           dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]))
    quantize_(model, RowwiseQuantConfig(budget_fraction=0.3))
    model.eval()
    batch = SyntheticClickDataset(cfg, 64, 1).global_batch(0)
    with torch.no_grad():
        ref = model(batch)[1][1].clone()
        sharded, plan, _ = shard_for_inference(model, world_size=2)
        got = sharded(batch)[1][1]
    assert len({ps.ranks[0] for mp in plan.plan.values() for ps in mp.values()}) == 2
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
