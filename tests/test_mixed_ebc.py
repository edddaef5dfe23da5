"""The row-wise mixed-precision collection against F.embedding_bag on dequantized weights;
DROP rows, memory report, bad ids and weights, state round trips."""

import os

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.quant import TIER_ORDER, Tier, assign_by_fractions
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection, dequantize_rows

def _cuda_or_skip():
    if not torch.cuda.is_available():
        if os.environ.get("SHARK_REQUIRE_CUDA"):
            pytest.fail("SHARK_REQUIRE_CUDA is set but CUDA is not available")
        pytest.skip("no CUDA device")
    return torch.device("cuda")


MIX = {"fp32": 0.05, "fp16": 0.1, "int8": 0.25, "int4": 0.3, "int2": 0.1, "drop": 0.2}


def _setup(pooling=PoolingType.SUM, weighted=False, fractions=MIX, seed=0, device=None):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name="t01", embedding_dim=8, num_embeddings=200,
                                 feature_names=["cat_0", "cat_1"], pooling=pooling),
              EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=300,
                                 feature_names=["cat_2"], pooling=pooling)]
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=device)
    p = {"t01": torch.rand(200), "t2": torch.rand(300)}
    a = assign_by_fractions(p, {"t01": 8, "t2": 16}, fractions)
    return tables, ebc, a


def _batch(ids_dtype=torch.int64, weighted=False, B=32):
    cfg = SyntheticConfig(fields=[
        __import__("shark_torchrec.data", fromlist=["SyntheticField"]).SyntheticField("cat_0", 200, max_hot=4),
        __import__("shark_torchrec.data", fromlist=["SyntheticField"]).SyntheticField("cat_1", 200, min_hot=0, max_hot=3),
        __import__("shark_torchrec.data", fromlist=["SyntheticField"]).SyntheticField("cat_2", 300, max_hot=6)],
        informative=[], num_dense=1, seed=2)
    kjt = SyntheticClickDataset(cfg, B, 1, id_dtype=ids_dtype).global_batch(0).sparse_features
    if weighted:
        w = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(1))
        kjt = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths(), weights=w)
    return kjt


def _reference(tables, ebc, assignment, kjt):
    """F.embedding_bag over the dequantized mixed table (DROP rows are zero rows), on CPU."""
    out = {}
    kjt = kjt.to(torch.device("cpu"))
    for c in tables:
        w = ebc.embedding_bags[c.name].weight.detach().cpu()
        deq = torch.zeros_like(w)
        for i, tier in enumerate(TIER_ORDER):
            rows = assignment.tiers[c.name].long() == i
            if rows.any():
                deq[rows] = dequantize_rows(w[rows], tier)
        for f in c.feature_names:
            jt = kjt[f]
            out[f] = F.embedding_bag(jt.values().long(), deq, jt.offsets()[:-1].long(),
                                     mode="sum" if c.pooling == PoolingType.SUM else "mean",
                                     per_sample_weights=jt.weights_or_none(), include_last_offset=False)
    return out


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("groups", [1, 2])
def test_equals_embedding_bag_on_dequantized_weights(pooling, ids_dtype, groups) -> None:
    tables, ebc, a = _setup(pooling)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=groups)
    assert len(m.groups) == groups
    kjt = _batch(ids_dtype)
    kt = m(kjt)
    assert kt.keys() == ["cat_0", "cat_1", "cat_2"] and kt.length_per_key() == [8, 8, 16]
    assert kt.keys() == ebc(kjt).keys() and kt.length_per_key() == ebc(kjt).length_per_key()
    ref = _reference(tables, ebc, a, kjt)
    for f, r in ref.items():
        assert (kt.to_dict()[f] - r).abs().max() <= 1e-6, f
    # Quantization really happened: the output is not the fp32 one.
    assert (kt.values() - ebc(kjt).values()).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_cuda_matches_dequantized_weights(pooling, ids_dtype) -> None:
    """On CUDA, FBGEMM's nbit kernels dequantize INT8/INT4 rows in half precision, so the
    output matches the fp32 reference to ~2e-4 relative (measured on an H200), not bit for bit;
    FP32/FP16 rows stay exact.  INT2 is refused on CUDA (see RowwiseMixedEmbeddingBagCollection)."""
    device = _cuda_or_skip()
    mix = {"fp32": 0.1, "fp16": 0.2, "int8": 0.3, "int4": 0.2, "drop": 0.2}
    tables, ebc, a = _setup(pooling, device=device, fractions=mix)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    assert all(tbe.weights_dev.numel() > 0 for g in m.groups for tbe in g.qebc._emb_modules)
    kjt = _batch(ids_dtype).to(device)
    got = {f: v.cpu() for f, v in m(kjt).to_dict().items()}
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert float((got[f] - r).norm() / r.norm()) <= 1e-3, f
    exact = {"fp32": 0.5, "fp16": 0.3, "drop": 0.2}
    tables, ebc, a = _setup(pooling, device=device, fractions=exact)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    got = {f: v.cpu() for f, v in m(kjt).to_dict().items()}
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (got[f] - r).abs().max() <= 1e-6, f
    pre = m.input_transform(kjt)
    assert torch.equal(m(pre).values(), m(kjt).values())
    with pytest.raises(NotImplementedError, match="INT2"):
        RowwiseMixedEmbeddingBagCollection.from_float(*_setup(pooling, device=device, fractions={"int2": 1.0})[1:])


def test_weighted_inputs() -> None:
    tables, ebc, a = _setup(weighted=True)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = _batch(weighted=True)
    ref = _reference(tables, ebc, a, kjt)
    got = m(kjt).to_dict()
    for f, r in ref.items():
        assert (got[f] - r).abs().max() <= 1e-6, f


def test_a_table_group_with_every_row_dropped() -> None:
    tables, ebc, _ = _setup()
    from shark_torchrec.quant import TierAssignment

    a = TierAssignment({"t01": torch.full((200,), TIER_ORDER.index(Tier.INT8), dtype=torch.int8),
                        "t2": torch.full((300,), TIER_ORDER.index(Tier.DROP), dtype=torch.int8)},
                       {"t01": 8, "t2": 16})
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=2)
    kjt = _batch()
    out = m(kjt).to_dict()
    assert torch.count_nonzero(out["cat_2"]) == 0
    assert torch.equal(m(m.input_transform(kjt)).values(), m(kjt).values())
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (out[f] - r).abs().max() <= 1e-6


def test_drop_rows_read_as_zeros_and_store_nothing() -> None:
    tables, ebc, a = _setup(fractions={"int8": 0.5, "drop": 0.5})
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    dropped = (a.tiers["t2"].long() == TIER_ORDER.index(Tier.DROP)).nonzero().flatten()[:5]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["cat_0", "cat_1", "cat_2"], torch.cat([torch.tensor([0, 1]), dropped]),
        torch.tensor([1, 1, len(dropped)]))
    assert torch.count_nonzero(m(kjt).to_dict()["cat_2"]) == 0
    report = m.memory_report()
    assert set(report["tables"]["t2"]) == {"int8"}  # no DROP sub-table
    assert report["tables"]["t2"]["int8"] == a.bytes_per_tier("t2")[Tier.INT8]


def test_memory_report_equals_the_buffers_held() -> None:
    _, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    r = m.memory_report()
    assert len(m.groups) == min(2, torch.get_num_threads())
    held = sum(int(tbe.weights_host.numel() + tbe.weights_dev.numel() + tbe.weights_uvm.numel())
               for g in m.groups for tbe in g.qebc._emb_modules)
    assert r["weights_bytes"] == held
    assert sum(sum(t.values()) for t in r["tables"].values()) == held
    assert r["total_bytes"] == held + sum(g.input_transform.row_map.numel() * 4 for g in m.groups)
    assert sum(a.table_bytes(t) for t in a.tiers) == held  # the assignment predicted it


def test_bad_ids_and_weights() -> None:
    tables, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([3, 250, 7]),
                                              torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'cat_1': id 250 is outside table 't01' \(200 rows\)"):
        m(kjt)
    bad = KeyedJaggedTensor.from_lengths_sync(["cat_0", "nope"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(KeyError, match=r"unknown \['nope'\]"):
        m(bad)
    with torch.no_grad():
        ebc.embedding_bags["t2"].weight[17, 3] = float("nan")
    with pytest.raises(ValueError, match=r"table 't2': row 17 has NaN/Inf weights"):
        RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)


def test_state_dict_round_trip_without_the_float_model(tmp_path) -> None:
    tables, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    m.save(str(tmp_path / "mixed.pt"))
    again = RowwiseMixedEmbeddingBagCollection.load(str(tmp_path / "mixed.pt"))
    kjt = _batch()
    assert torch.equal(again(kjt).values(), m(kjt).values())
    assert again.memory_report() == m.memory_report()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt: not a loadable mixed-collection state"):
        RowwiseMixedEmbeddingBagCollection.load(str(tmp_path / "bad.pt"))
    other_tables, other_ebc, other_a = _setup(fractions={"int8": 1.0})
    other = RowwiseMixedEmbeddingBagCollection.from_float(other_ebc, other_a)
    with pytest.raises(ValueError, match="differently laid out"):
        other.load_state_dict(m.state_dict())


class _Transformed(torch.utils.data.IterableDataset):
    def __init__(self, transform, batches):
        self.transform, self.batches = transform, batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i, kjt in enumerate(self.batches):
            if info is None or i % info.num_workers == info.id:
                yield self.transform(kjt)


def test_input_transform_runs_in_data_loader_workers() -> None:
    _, ebc, a = _setup(pooling=PoolingType.MEAN)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    raw = [_batch(B=16 + i) for i in range(4)]
    loader = torch.utils.data.DataLoader(_Transformed(m.input_transform, raw), batch_size=None,
                                         num_workers=2)
    for kjt, pre in zip(raw, loader):
        assert pre.keys()[0] == "cat_0@fp32"
        assert torch.equal(m(pre).values(), m(kjt).values())


def test_vectorised_remap_used_on_cuda_equals_the_per_feature_one() -> None:
    _, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=1)
    t = m.groups[0].input_transform
    kjt = _batch()
    per_key = kjt.length_per_key()
    assert torch.equal(t._renumber_vectorised(kjt.values(), per_key),
                       t._renumber_per_feature(kjt.values(), per_key))
    bad = kjt.values().clone()
    bad[per_key[0] + 3] = 200  # a cat_1 id one past the end of t01
    with pytest.raises(ValueError, match=r"feature 'cat_1': id 200 is outside table 't01'"):
        t._renumber_vectorised(bad, per_key)
