"""The row-wise mixed-precision collection against F.embedding_bag on dequantized weights,
through both CPU lookups (the fused kernel and FBGEMM's bucketize + TBE path); DROP rows,
memory report, bad ids and weights, input features no table serves, state round trips."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.quant import TIER_ORDER, Tier, assign_by_fractions
from shark_torchrec.quant import mixed_ebc
from shark_torchrec.quant import id_map
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection, dequantize_rows
from shark_torchrec.quant.shared_rows import cluster_rows
from shark_torchrec.quant.tiers import quantization_error

# The two CPU lookups every reference test runs through.
LOOKUPS = ["kernel", "fbgemm"]


def _use(m, lookup):
    m.use_cpu_kernel = lookup == "kernel"
    return m


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


def _reference(tables, ebc, assignment, kjt, device_type="cpu", int2_fp16=False):
    """F.embedding_bag over the dequantized mixed table (DROP rows are zero rows), on CPU in
    fp32: rows as FBGEMM's kernels on ``device_type`` read them (dequantize_rows); with
    ``int2_fp16`` each bag's INT2 rows are pooled apart and their sum rounded to fp16."""
    out = {}
    kjt = kjt.to(torch.device("cpu"))
    for c in tables:
        w = ebc.embedding_bags[c.name].weight.detach().cpu()
        deq, deq_int2 = torch.zeros_like(w), torch.zeros_like(w)
        for i, tier in enumerate(TIER_ORDER):
            rows = assignment.tiers[c.name].long() == i
            if rows.any():
                target = deq_int2 if int2_fp16 and tier is Tier.INT2 else deq
                target[rows] = dequantize_rows(w[rows], tier, device_type, assignment.row_fit)
        for f in c.feature_names:
            jt = kjt[f]

            def pooled(table):
                return F.embedding_bag(jt.values().long(), table, jt.offsets()[:-1].long(), mode="sum",
                                       per_sample_weights=jt.weights_or_none())

            r = pooled(deq)
            if int2_fp16:
                r = r + pooled(deq_int2).half().float()
            if c.pooling == PoolingType.MEAN:
                r = r / jt.lengths().clamp(min=1).unsqueeze(1).float()
            out[f] = r
    return out


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("lookup", LOOKUPS)
def test_equals_embedding_bag_on_dequantized_weights(pooling, ids_dtype, groups, lookup) -> None:
    tables, ebc, a = _setup(pooling)
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=groups), lookup)
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


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_fitted_rows_read_as_their_dequantized_values(lookup) -> None:
    """Rows stored with the least-squares fit (row_fit="lsq") read, through the kernel and
    through FBGEMM's TBE, as the torch reference dequantizes them — and differ from min/max rows."""
    import dataclasses

    tables, ebc, a = _setup(fractions={"int8": 0.2, "int4": 0.3, "int2": 0.5})
    fitted = dataclasses.replace(a, row_fit="lsq")
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, fitted), lookup)
    kjt = _batch()
    kt = m(kjt)
    for f, r in _reference(tables, ebc, fitted, kjt).items():
        assert (kt.to_dict()[f] - r).abs().max() <= 1e-6, f
    plain = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)(kjt)
    assert (kt.values() - plain.values()).abs().max() > 1e-3
    # and closer to the fp32 lookup
    exact = ebc(kjt).values()
    assert (kt.values() - exact).pow(2).sum() < (plain.values() - exact).pow(2).sum()


@pytest.mark.gpu
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.SUM, True),
                                              (PoolingType.MEAN, False)])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_cuda_equals_embedding_bag_on_the_rows_cuda_reads(pooling, weighted, ids_dtype) -> None:
    """Every tier on CUDA (FBGEMM tables in EmbeddingLocation.DEVICE) against the fp32 reference
    on the rows as FBGEMM's CUDA kernels dequantize them (one fp16 fma per element), INT2 bags
    pooled through the fp16-output call."""
    device = _cuda_or_skip()
    tables, ebc, a = _setup(pooling, weighted=weighted, device=device)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    assert all(tbe.weights_dev.numel() > 0 for g in m.groups for tbe in g.qebc._emb_modules)
    assert all(len(g._lookups(device)) == 2 for g in m.groups)  # INT2 in its own fp16-output call
    kjt = _batch(ids_dtype, weighted=weighted).to(device)
    got = {f: v.cpu() for f, v in m(kjt).to_dict().items()}
    for f, r in _reference(tables, ebc, a, kjt, device_type="cuda", int2_fp16=True).items():
        assert (got[f] - r).abs().max() <= 1e-6, f
    pre = m.input_transform(kjt)
    assert torch.equal(m(pre).values(), m(kjt).values())


@pytest.mark.gpu
def test_cuda_fp32_output_of_int2_rows_is_still_wrong_upstream() -> None:
    """Why INT2 rows take the fp16-output call on CUDA: FBGEMM's fp32 store of INT2 results
    reads 12 of every 16 values from past its accumulator.  When this fails, FBGEMM has fixed
    it and ``int2_fp16_output`` can go."""
    device = _cuda_or_skip()
    tables, ebc, a = _setup(device=device, fractions={"int2": 1.0})
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = _batch(torch.int32).to(device)
    ref = _reference(tables, ebc, a, kjt, device_type="cuda", int2_fp16=True)
    got = {f: v.cpu() for f, v in m(kjt).to_dict().items()}
    assert all((got[f] - r).abs().max() <= 1e-6 for f, r in ref.items())
    for g in m.groups:
        g.int2_fp16_output = False
    got = {f: v.cpu() for f, v in m(kjt).to_dict().items()}
    assert max(float((got[f] - r).abs().max()) for f, r in ref.items()) > 1e-2


@pytest.mark.gpu
def test_cuda_forward_synchronises_only_to_check_ids() -> None:
    """With ``check_ids=False`` a CUDA forward never waits for the device (remap, bucketize,
    lookups, MEAN); with the check, once."""
    device = _cuda_or_skip()
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        _, ebc, a = _setup(pooling, device=device)
        kjt = _batch(torch.int32).to(device)
        for check_ids, expected in ((False, 0), (True, 1)):
            m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, check_ids=check_ids)
            want = m(kjt).values().clone()  # warm: plans and index tensors are built once
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = m(kjt).values()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) == expected, (pooling, check_ids, [str(w.message) for w in syncs])
            assert torch.equal(out, want)


def test_int2_rows_through_the_fp16_output_lookup() -> None:
    """The lookup CUDA uses for INT2 rows (a second FBGEMM call, fp16 output), run on CPU:
    the other tiers stay exact, each bag's INT2 part is its fp32 sum rounded to fp16."""
    for pooling, weighted in ((PoolingType.SUM, True), (PoolingType.MEAN, False)):
        tables, ebc, a = _setup(pooling, weighted=weighted)
        m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=1)
        m.use_cpu_kernel = False  # the FBGEMM path, as on CUDA
        m.groups[0].int2_fp16_output = True
        assert [c.output_dtype.name for c in m.groups[0]._lookups(torch.device("cpu"))] == ["FP32", "FP16"]
        kjt = _batch(weighted=weighted)
        got = m(kjt).to_dict()
        ref = _reference(tables, ebc, a, kjt, int2_fp16=True)
        plain = _reference(tables, ebc, a, kjt)
        for f, r in ref.items():
            assert (got[f] - r).abs().max() <= 1e-6, f
        # The reference tells the two apart: the fp16 rounding is really there.
        assert max(float((ref[f] - plain[f]).abs().max()) for f in ref) > 1e-6
        assert torch.equal(m(m.input_transform(kjt)).values(), m(kjt).values())


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_weighted_inputs(lookup) -> None:
    tables, ebc, a = _setup(weighted=True)
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    kjt = _batch(weighted=True)
    ref = _reference(tables, ebc, a, kjt)
    got = m(kjt).to_dict()
    for f, r in ref.items():
        assert (got[f] - r).abs().max() <= 1e-6, f


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_a_table_group_with_every_row_dropped(lookup) -> None:
    tables, ebc, _ = _setup()
    from shark_torchrec.quant import TierAssignment

    a = TierAssignment({"t01": torch.full((200,), TIER_ORDER.index(Tier.INT8), dtype=torch.int8),
                        "t2": torch.full((300,), TIER_ORDER.index(Tier.DROP), dtype=torch.int8)},
                       {"t01": 8, "t2": 16})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=2), lookup)
    kjt = _batch()
    out = m(kjt).to_dict()
    assert torch.count_nonzero(out["cat_2"]) == 0
    torch.testing.assert_close(m(m.input_transform(kjt)).values(), m(kjt).values(), rtol=0, atol=1e-6)
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (out[f] - r).abs().max() <= 1e-6


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("lookup", LOOKUPS)
def test_tables_using_different_tiers(pooling, lookup) -> None:
    """Tables without rows in some tiers: their buckets are empty and sit between the ones
    looked up, so the lookup gathers bag offsets instead of slicing them."""
    from shark_torchrec.quant import TierAssignment

    tables, ebc, _ = _setup(pooling)
    fp32, fp16, int8, drop = (TIER_ORDER.index(t) for t in (Tier.FP32, Tier.FP16, Tier.INT8, Tier.DROP))
    t01 = torch.tensor([fp32, int8, drop, int8], dtype=torch.int8).repeat(50)
    t2 = torch.tensor([fp16, int8, int8], dtype=torch.int8).repeat(100)
    a = TierAssignment({"t01": t01, "t2": t2}, {"t01": 8, "t2": 16})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=1), lookup)
    kjt = _batch()
    call = m.groups[0]._lookups(torch.device("cpu"))[0]
    assert call.tensors(m.groups[0], m.groups[0].qebc._emb_modules[0],
                        m.input_transform.parts[0].bucket_keys, torch.device("cpu"))["first"] is None
    ref = _reference(tables, ebc, a, kjt)
    for out in (m(kjt).to_dict(), m(m.input_transform(kjt)).to_dict()):
        for f, r in ref.items():
            assert (out[f] - r).abs().max() <= 1e-6, f


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_drop_rows_read_as_zeros_and_store_nothing(lookup) -> None:
    tables, ebc, a = _setup(fractions={"int8": 0.5, "drop": 0.5})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
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
    assert len(m.groups) == 1  # one TBE: the CPU kernel splits work over threads by bags
    held = sum(int(tbe.weights_host.numel() + tbe.weights_dev.numel() + tbe.weights_uvm.numel())
               for g in m.groups for tbe in g.qebc._emb_modules)
    assert r["weights_bytes"] == held
    assert sum(sum(t.values()) for t in r["tables"].values()) == held
    # bit-packed id-map entries: 8 bits for 200 rows (up to 250 renumbered: 200 + 50
    # centroids), 9 for 300 (375): 200 and 337.5 bytes, each table's rounded up to 4; the tail
    assert r["id_map_bytes"] == 200 + 340 + id_map.TAIL_BYTES
    assert r["total_bytes"] == held + sum(g.input_transform.row_map.numel() for g in m.groups)
    assert sum(a.table_bytes(t) for t in a.tiers) == held  # the assignment predicted it


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_bad_ids_and_weights(lookup) -> None:
    tables, ebc, a = _setup()
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    kjt = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([3, 250, 7]),
                                              torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'cat_1': id 250 is outside table 't01' \(200 rows\)"):
        m(kjt)
    negative = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([3, 4, -1]),
                                                   torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'cat_2': id -1 is outside table 't2' \(300 rows\)"):
        m(negative)
    bad = KeyedJaggedTensor.from_lengths_sync(["cat_0", "nope"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(KeyError, match=r"missing \['cat_1', 'cat_2'\]"):
        m(bad)
    with torch.no_grad():
        ebc.embedding_bags["t2"].weight[17, 3] = float("nan")
    with pytest.raises(ValueError, match=r"table 't2': row 17 has NaN/Inf weights"):
        RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_malformed_batches_are_refused(lookup) -> None:
    """Float ids, negative lengths and lengths that do not add up to the ids raise, naming what
    is wrong (the fused kernel used to return output for the last two)."""
    tables, ebc, a = _setup()
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    keys = ["cat_0", "cat_1", "cat_2"]

    def kjt(values, lengths, weights=None):
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)

    with pytest.raises(ValueError, match=r"ids must be int32 or int64, got torch\.float32"):
        m(kjt(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match=r"lengths add up to 2 ids, but 3 ids were given"):
        m(kjt(torch.tensor([1, 2, 3]), torch.tensor([1, 1, 0])))
    with pytest.raises(ValueError, match=r"lengths add up to 4 ids, but 3 ids were given"):
        m(kjt(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 1])))
    with pytest.raises(ValueError, match=r"feature 'cat_2': negative length -1 at sample 0"):
        m(kjt(torch.tensor([1, 2, 3]), torch.tensor([2, 2, -1])))
    with pytest.raises(ValueError, match=r"feature 'cat_0': negative length -2"):
        m(KeyedJaggedTensor(keys=keys, values=torch.tensor([1, 2]), lengths=torch.tensor([-2, 4, 0, 0, 0, 0]),
                            stride=2))


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_weights_are_read_as_torchrec_reads_them(lookup) -> None:
    """An unweighted collection ignores per-id weights (TorchRec's float and quantized
    collections do; the kernels used to multiply by them); a weighted one refuses an input
    without weights, as TorchRec's does, and weights not one per id."""
    tables, ebc, a = _setup(fractions={"int8": 1.0})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    plain = _batch()
    weighted = _batch(weighted=True)
    assert torch.equal(weighted.values(), plain.values())
    assert torch.equal(m(weighted).values(), m(plain).values())
    torch.testing.assert_close(m(weighted).values(), ebc(weighted).values(), atol=0.02, rtol=0)
    tables, webc, wa = _setup(weighted=True, fractions={"int8": 1.0})
    w = _use(RowwiseMixedEmbeddingBagCollection.from_float(webc, wa), lookup)
    torch.testing.assert_close(w(weighted).values(), webc(weighted).values(), atol=0.02, rtol=0)
    assert not torch.allclose(w(weighted).values(), m(weighted).values(), atol=0.1)
    with pytest.raises(AssertionError):  # TorchRec's own
        webc(plain)
    with pytest.raises(ValueError, match="weighted, but the input has no per-id weights"):
        w(plain)
    short = KeyedJaggedTensor(keys=weighted.keys(), values=weighted.values(), lengths=weighted.lengths(),
                              weights=weighted.weights()[:-1])
    with pytest.raises(ValueError, match=r"per-id weights for \d+ ids"):
        w(short)


@pytest.mark.parametrize("lookup", LOOKUPS + ["fx"])
def test_strided_ids_weights_and_offsets_are_read_as_their_values(lookup) -> None:
    """Ids, per-id weights or offsets given as strided views (a column of a wider tensor) are
    read as the values they hold, as TorchRec's own collection reads them: both lookups read
    these tensors by their data pointer and once read a view as if it were packed (other ids,
    other weights, no error)."""
    tables, ebc, a = _setup(weighted=True, fractions={"fp32": 1.0})  # fp32 rows: exactly TorchRec's
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), "fbgemm" if lookup == "fbgemm" else "kernel")
    f = torch.fx.symbolic_trace(m) if lookup == "fx" else m
    kjt = _batch(weighted=True)
    keys, n = kjt.keys(), kjt.values().numel()
    wide_ids = torch.stack([kjt.values(), torch.randint(0, 200, (n,))], 1)  # the ids in column 0
    wide_w = torch.stack([kjt.weights(), torch.full((n,), 9.0)], 1)
    offsets = kjt.offsets()
    wide_offsets = torch.stack([offsets, offsets + 1000], 1)
    want = ebc(kjt).values()
    for strided in (KeyedJaggedTensor(keys=keys, values=wide_ids[:, 0], lengths=kjt.lengths(), weights=kjt.weights()),
                    KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=kjt.lengths(), weights=wide_w[:, 0]),
                    KeyedJaggedTensor(keys=keys, values=kjt.values(), offsets=wide_offsets[:, 0],
                                      weights=kjt.weights())):
        torch.testing.assert_close(f(strided).values(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_inputs_no_lookup_can_read_whole_are_refused(lookup) -> None:
    """A batch size per feature (a variable-batch input) and a feature given twice are refused
    by both lookups (the FBGEMM path used to drop a feature's extra bags, or read one of the
    two copies, without an error)."""
    tables, ebc, a = _setup()
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    keys = ["cat_0", "cat_1", "cat_2"]
    vbe = KeyedJaggedTensor(keys=keys, values=torch.tensor([1, 2, 3, 4, 5, 6, 7]),
                            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1]),
                            stride_per_key_per_rank=[[2], [3], [2]])
    with pytest.raises(ValueError, match="a batch size per feature"):
        m(vbe)
    twice = KeyedJaggedTensor(keys=["cat_0", "cat_1", "cat_2", "cat_1"], values=torch.tensor([1, 2, 3, 4]),
                              lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(KeyError, match="input feature 'cat_1' appears more than once"):
        m(twice)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_empty_mean_batches_and_other_weight_dtypes(lookup) -> None:
    """An empty batch with MEAN pooling gives an empty output on both lookups (the FBGEMM path
    used to fail on it), and per-id weights in float64 or bfloat16 are read as float32 by both,
    as TorchRec's collection reads them."""
    tables, ebc, a = _setup(pooling=PoolingType.MEAN, fractions={"fp32": 1.0})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    empty = KeyedJaggedTensor(keys=["cat_0", "cat_1", "cat_2"], values=torch.zeros(0, dtype=torch.long),
                              lengths=torch.zeros(0, dtype=torch.long), stride=0)
    assert m(empty).values().shape == (0, 32)
    tables, ebc, a = _setup(weighted=True, fractions={"fp32": 1.0})  # (TorchRec weighs SUM bags only)
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    kjt = _batch(weighted=True)
    for dtype in (torch.float64, torch.bfloat16):
        other = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                  weights=kjt.weights().to(dtype))
        exact = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                  weights=kjt.weights().to(dtype).float())
        torch.testing.assert_close(m(other).values(), ebc(exact).values(), atol=1e-6, rtol=1e-6)


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


def test_a_module_that_has_served_reads_its_tensors_as_they_are_now() -> None:
    """The forward keeps the kernel's inputs between calls: a state loaded in place, a deep copy
    and a replaced id map must all be read as they are now."""
    tables, ebc, a = _setup(seed=0)
    _, other_ebc, _ = _setup(seed=1)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    other = RowwiseMixedEmbeddingBagCollection.from_float(other_ebc, a)
    kjt = _batch()
    with torch.no_grad():
        before = m(kjt).values()
        twin = copy.deepcopy(m)  # its kept inputs must be its own tensors, not m's
        twin.load_state_dict(other.state_dict())
        assert torch.equal(twin(kjt).values(), other(kjt).values())
        assert not torch.equal(twin(kjt).values(), before)
        assert torch.equal(m(kjt).values(), before)
        with pytest.raises(ValueError, match="assign=True is not supported"):
            m.load_state_dict(other.state_dict(), assign=True)
        # A new id map object sending every id to the row of id 0 of its table.
        zeros = KeyedJaggedTensor(keys=kjt.keys(), values=torch.zeros_like(kjt.values()),
                                  lengths=kjt.lengths())
        expected = m(zeros).values()
        transform = m.groups[0].input_transform
        row_map = transform.row_map.clone()
        for c in tables:
            base, bits = transform.table_base[c.name], transform.table_bits[c.name]
            first = id_map.gather(row_map, base, torch.zeros(1, dtype=torch.long), bits)
            id_map.write(row_map, base, None, first.repeat(c.num_embeddings), bits)
        transform.row_map = row_map
        assert torch.equal(m(kjt).values(), expected)


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
        # Split by tier beforehand, the bags are read by FBGEMM's TBE (tier by tier, then
        # added up); raw, by the fused kernel: the same rows, summed in another order.
        torch.testing.assert_close(m(pre).values(), m(kjt).values(), rtol=0, atol=1e-6)


def test_vectorised_remap_used_on_cuda_equals_the_per_feature_one() -> None:
    _, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=1)
    t = m.groups[0].input_transform
    kjt = _batch()
    per_key = kjt.length_per_key()
    assert torch.equal(t._renumber_vectorised(kjt.values(), kjt.lengths()),
                       t._renumber_per_feature(kjt.values(), per_key))
    bad = kjt.values().clone()
    bad[per_key[0] + 3] = 200  # a cat_1 id one past the end of t01
    with pytest.raises(ValueError, match=r"feature 'cat_1': id 200 is outside table 't01'"):
        t._renumber_vectorised(bad, kjt.lengths())


def test_the_cpu_kernel_builds_and_is_used(monkeypatch) -> None:
    """The fused kernel is what a CPU forward runs (FBGEMM's ops are not called)."""
    assert cpu_kernel_available()
    tables, ebc, a = _setup()
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = _batch()

    def fail(*args, **kwargs):
        raise AssertionError("FBGEMM path used")

    monkeypatch.setattr(m.groups[0], "forward", fail)
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (m(kjt).to_dict()[f] - r).abs().max() <= 1e-6, f


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, True), (PoolingType.MEAN, False)])
def test_a_batch_split_over_threads_reads_the_same(monkeypatch, pooling, weighted) -> None:
    """Above ``IDS_PER_THREAD`` ids a batch is read in parts by several threads into one
    output: every bag comes out bit for bit as in one call."""
    tables, ebc, a = _setup(pooling, weighted=weighted)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=2)
    kjt = _batch(weighted=weighted, B=257)
    one = m(kjt).values().clone()
    threads = torch.get_num_threads()
    monkeypatch.setattr(mixed_ebc, "IDS_PER_THREAD", 8)
    try:
        torch.set_num_threads(3)
        parts = m(kjt).values()
    finally:
        torch.set_num_threads(threads)
    assert m._pool is not None and m._pool._max_workers == 3  # really split
    assert torch.equal(parts, one)
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (m(kjt).to_dict()[f] - r).abs().max() <= 1e-6, f


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_features_no_table_serves_are_ignored_unless_strict(lookup) -> None:
    """As TorchRec's collections: an input may carry features the collection does not serve
    (e.g. fields pruned away), in any order; with ``strict=True`` they raise, named."""
    tables, ebc, a = _setup()
    kjt = _batch()
    d = kjt.to_dict()
    extra = KeyedJaggedTensor.from_jt_dict({"dropped_a": d["cat_1"], "cat_2": d["cat_2"], "cat_0": d["cat_0"],
                                            "dropped_b": d["cat_0"], "cat_1": d["cat_1"]})
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    float_out = ebc(extra)  # TorchRec's own collection ignores them
    out = m(extra)
    assert out.keys() == float_out.keys() == ["cat_0", "cat_1", "cat_2"]
    ref = _reference(tables, ebc, a, kjt)
    for f, r in ref.items():
        assert (out.to_dict()[f] - r).abs().max() <= 1e-6, f
    strict = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, strict=True), lookup)
    assert torch.equal(strict(kjt).values(), m(kjt).values())
    with pytest.raises(KeyError, match=r"unknown \['dropped_a', 'dropped_b'\], missing \[\]"):
        strict(extra)
    with pytest.raises(KeyError, match=r"unknown \['dropped_a', 'dropped_b'\]"):
        strict.input_transform(extra)
    # The input transform ignores them too, and its output reads the same.
    torch.testing.assert_close(m(m.input_transform(extra)).values(), out.values(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_row_alignment_1_reads_the_same_and_stores_less(tmp_path, lookup) -> None:
    """CPU-only layout: rows padded to 1 byte (FBGEMM's CPU default) instead of 16."""
    import dataclasses

    from shark_torchrec.quant.layout import MixedLayout
    from shark_torchrec.quant.tiers import row_bytes

    tables, ebc, a = _setup()
    a1 = dataclasses.replace(a, row_alignment=1)
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a1), lookup)
    m16 = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = _batch()
    kt = m(kjt)
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (kt.to_dict()[f] - r).abs().max() <= 1e-6, f
    # An 8-dim INT4 row: 4 bytes of codes + fp16 scale and bias = 8 bytes, not 16.
    assert row_bytes(Tier.INT4, 8, 1) == 8 and row_bytes(Tier.INT4, 8, 16) == 16
    held = m.memory_report()["weights_bytes"]
    assert held == sum(a1.table_bytes(t) for t in a1.tiers) < m16.memory_report()["weights_bytes"]
    m.save(str(tmp_path / "m.pt"))
    again = _use(RowwiseMixedEmbeddingBagCollection.load(str(tmp_path / "m.pt")), lookup)
    assert again.layout.row_alignment == 1 and torch.equal(again(kjt).values(), kt.values())
    # Layouts saved before the alignment was stored read as 16; GPUs need 16.
    old = {k: v for k, v in m16.layout.to_dict().items() if k != "row_alignment"}
    assert MixedLayout.from_dict(old).row_alignment == 16
    with pytest.raises(ValueError, match="row_alignment 1 is for tables served on CPU"):
        RowwiseMixedEmbeddingBagCollection(m.layout, device=torch.device("cuda"))
    with pytest.raises(ValueError, match=r"row_alignment must be one of \(1, 2, 4, 8, 16\), got 3"):
        dataclasses.replace(m.layout, row_alignment=3)


@pytest.mark.parametrize("dim", [4, 8, 12, 16, 24, 40, 48, 64, 128, 136])
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.SUM, True),
                                              (PoolingType.MEAN, False)])
def test_the_kernel_pools_every_dim_and_bag_length(dim, pooling, weighted) -> None:
    """The fused kernel has a register-accumulating path per dim that is a multiple of 8 (up
    to 128; 16-float registers for multiples of 16 on AVX-512 CPUs) and a generic path for
    other dims: each against F.embedding_bag on the dequantized rows, with empty, one-id and
    long bags over every tier."""
    torch.manual_seed(dim)
    tables = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=500,
                                 feature_names=["one_hot", "multi_hot"], pooling=pooling)]
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted)
    # FBGEMM packs INT2 rows only for dims that are a multiple of 8.
    mix = MIX if dim % 8 == 0 else {**{k: v for k, v in MIX.items() if k != "int2"}, "int4": 0.4}
    a = assign_by_fractions({"t": torch.rand(500)}, {"t": dim}, mix)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    assert m.use_cpu_kernel and cpu_kernel_available()
    g = torch.Generator().manual_seed(dim)
    multi = torch.randint(0, 41, (64,), generator=g)
    multi[:3] = torch.tensor([0, 1, 40])  # an empty, a one-id and a long bag at least
    lengths = torch.cat([torch.ones(64, dtype=torch.long), multi])
    kjt = KeyedJaggedTensor.from_lengths_sync(["one_hot", "multi_hot"],
                                              torch.randint(0, 500, (int(lengths.sum()),), generator=g), lengths)
    if weighted:
        w = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(1))
        kjt = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths(), weights=w)
    out = m(kjt).to_dict()
    for f, r in _reference(tables, ebc, a, kjt).items():
        assert (out[f] - r).abs().max() <= 1e-6 * max(1.0, float(r.abs().max())), f


@pytest.mark.parametrize("row_alignment", [1, 16])
@pytest.mark.parametrize("dim", [8, 12, 16, 20, 24, 64])
@pytest.mark.parametrize("row_fit", ["minmax", "lsq"])
def test_the_conversion_kernel_stores_what_fbgemm_quantizers_store(row_alignment, dim, row_fit, monkeypatch) -> None:
    """from_weights' one-pass CPU kernel (csrc/quantize_rows.cpp) against the torch path
    (FBGEMM's quantizer ops for minmax, rows.fit_scale_bias for lsq), byte for byte: every
    sub-table's rows, scales and biases, and the id map.  Dims 12 and 20 pack INT2 codes into
    an odd number of bytes, which FBGEMM's quantizer op refuses as such (padded)."""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here")
    torch.manual_seed(dim)
    configs = [EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=r, feature_names=[f"f_{n}"])
               for n, r in (("a", 700), ("b", 33))]
    weights = {c.name: torch.randn(c.num_embeddings, dim) * torch.rand(c.num_embeddings, 1) for c in configs}
    weights["a"][5] = 0.25  # constant rows: FBGEMM's range-0 case
    weights["a"][6] = 0.0
    weights["a"][7] = torch.linspace(-1e4, 1e4, dim)  # a wide row
    tiers = {c.name: torch.randint(0, len(TIER_ORDER), (c.num_embeddings,), dtype=torch.int8) for c in configs}
    shared = {c.name: cluster_rows(weights[c.name], None, 4) for c in configs}  # SHARED rows' centroids
    fast = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=row_alignment,
                                                           shared=shared, row_fit=row_fit)
    monkeypatch.setattr(mixed_ebc, "cpu_kernel_available", lambda: False)
    ref = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=row_alignment,
                                                          shared=shared, row_fit=row_fit)
    a, b = fast.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k].view(torch.uint8) if a[k].dtype != torch.int32 else a[k],
                               b[k].view(torch.uint8) if b[k].dtype != torch.int32 else b[k]), k
    assert torch.equal(fast.groups[0].weight_buffer(), ref.groups[0].weight_buffer())


@pytest.mark.parametrize("dim,tier", [(7, Tier.INT8), (6, Tier.INT4), (4, Tier.INT2), (12, Tier.INT2), (20, Tier.INT2),
                                      (16, Tier.INT4)])
def test_rows_of_an_odd_byte_width_read_as_dequantize_rows_says(dim, tier) -> None:
    """INT8 rows of odd dims, INT4 of dims 2 mod 4, INT2 of dims 4 mod 8 pack into an odd number
    of bytes: the collection stores and reads them (TBE and fused kernel), while FBGEMM's
    quantizer and dequantizer ops refused them, so ``dequantize_rows`` and
    ``quantization_error`` raised.  Each must equal what the collection reads, row by row."""
    c = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=40, feature_names=["f"])
    w = torch.randn(40, dim, generator=torch.Generator().manual_seed(dim)) * torch.linspace(0.01, 3, 40)[:, None]
    t = torch.full((40,), TIER_ORDER.index(tier), dtype=torch.int8)
    m = RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": t})
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(40), torch.ones(40, dtype=torch.long))
    for kernel in ([True, False] if cpu_kernel_available() else [False]):
        m.use_cpu_kernel = kernel
        read = m(kjt).to_dict()["f"]
        assert torch.equal(read, dequantize_rows(w, tier)), kernel
        assert torch.equal(quantization_error(w, tier), ((w - read).double() ** 2).sum(1)), kernel


def test_the_conversion_kernel_names_a_non_finite_row() -> None:
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here")
    c = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
    w = torch.randn(50, 8)
    w[31, 4] = float("inf")
    for tier in (Tier.INT4, Tier.DROP):  # a dropped row must be finite too
        t = torch.full((50,), TIER_ORDER.index(tier), dtype=torch.int8)
        with pytest.raises(ValueError, match=r"table 't': row 31 has NaN/Inf weights"):
            RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": t})


def test_stored_rows_of_another_shape_are_refused_not_broadcast() -> None:
    """Rows written into a sub-table must have its row width: a one-column source was
    broadcast over every column (copy_), silently."""
    c = EmbeddingBagConfig(name="t", num_embeddings=6, embedding_dim=8, feature_names=["f"])
    tiers = {"t": torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int8)}  # fp16 and int8 rows
    m = RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": torch.randn(6, 8)}, tiers)
    group = m.groups[0]
    w, sb = group._tbe_views()["t@fp16"]
    group._set_weights("t@fp16", (w[:2].clone(), None), 1)  # a partial write that fits
    with pytest.raises(ValueError, match=r"sub-table 't@fp16': rows of shape \(2, 1\) from row 0 do not fit"):
        group._set_weights("t@fp16", (w[:2, :1].clone(), None), 0)
    with pytest.raises(ValueError, match=r"sub-table 't@fp16': rows of shape \(3, 16\) from row 1 do not fit"):
        group._set_weights("t@fp16", (torch.zeros(3, w.shape[1], dtype=w.dtype), None), 1)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_rows_beyond_fp16_range_are_refused_where_their_tier_cannot_store_them(lookup, monkeypatch) -> None:
    """A finite row beyond FP16's range (+-65504) stored FP16 read as inf, and stored INT8 with a
    minimum below -65504 read as NaN (its fp16 bias overflowed): an error naming the table, row
    and tier, by the conversion kernel and by the torch path alike; fp32 stores it."""
    if lookup == "fbgemm":  # (the torch/FBGEMM conversion, where no kernel runs)
        monkeypatch.setattr(mixed_ebc, "cpu_kernel_available", lambda: False)
    elif not cpu_kernel_available():
        pytest.skip("the CPU kernels could not be built here")
    c = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=6, feature_names=["f"])
    w = torch.randn(6, 8) * 0.1
    w[2, 3] = 1e5
    w[4, 1] = -1e5
    for tier, row in ((Tier.FP16, 2), (Tier.INT8, 4), (Tier.INT2, 4)):
        t = torch.full((6,), TIER_ORDER.index(Tier.FP32), dtype=torch.int8)
        t[row] = TIER_ORDER.index(tier)
        with pytest.raises(ValueError, match=rf"table 't': row {row} .*beyond FP16's range.*{tier.value}"):
            RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": t})
    t = torch.full((6,), TIER_ORDER.index(Tier.INT8), dtype=torch.int8)
    t[[2, 4]] = TIER_ORDER.index(Tier.FP32)
    m = _use(RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": t}), lookup)
    out = m(KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(6), torch.ones(6, dtype=torch.long)))["f"]
    assert torch.equal(out[2], w[2]) and torch.equal(out[4], w[4])


def test_tier_indices_and_centroid_indices_outside_their_range_are_refused() -> None:
    """A tier index outside TIER_ORDER, and a SHARED row's centroid index outside its table's
    centroids (it read as another tier's row), are errors naming the table."""
    c = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=8, feature_names=["f"])
    w = torch.randn(8, 8)
    bad = torch.zeros(8, dtype=torch.int8)
    bad[5] = 9
    with pytest.raises(ValueError, match=r"table 't': row 5 has tier index 9"):
        RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": bad})
    tiers = torch.full((8,), TIER_ORDER.index(Tier.SHARED), dtype=torch.int8)
    tiers[:2] = TIER_ORDER.index(Tier.INT8)
    s = cluster_rows(w, None, 2)
    for wrong in (2, -1):
        s.index[4] = wrong
        with pytest.raises(ValueError, match=rf"table 't': a SHARED row's centroid index {wrong} is outside its 2"):
            RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": w}, {"t": tiers}, shared={"t": s})


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_offsets_not_from_zero_and_outputs_of_another_width_are_refused(lookup) -> None:
    """A KJT whose offsets start past 0 (the fused kernel pooled from there; TorchRec raises),
    and ``pooled_into`` an output wider than the collection's (the kernel wrote part of it)."""
    tables, ebc, a = _setup()
    m = _use(RowwiseMixedEmbeddingBagCollection.from_float(ebc, a), lookup)
    keys = ["cat_0", "cat_1", "cat_2"]
    kjt = KeyedJaggedTensor(keys=keys, values=torch.arange(5), offsets=torch.tensor([2, 3, 3, 3, 4, 5, 5]))
    with pytest.raises(ValueError, match=r"offsets must start at 0, got 2"):
        m(kjt)
    good = KeyedJaggedTensor(keys=keys, values=torch.arange(3), lengths=torch.tensor([1, 0, 1, 0, 0, 1]))
    width = m(good).values().shape[1]
    with pytest.raises(ValueError, match=rf"out must be \[2, {width}\]"):
        m.pooled_into(good, torch.zeros(2, width + 5))
    out = torch.zeros(2, width)
    assert torch.equal(m.pooled_into(good, out), m(good).values())
