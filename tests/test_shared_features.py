"""A feature read by several tables (TorchRec's "shared features"): the mixed collection gives
one output per (feature, table), named ``feature@table`` as TorchRec's collections name it, and
every column holds that table's pooled rows — on every path: the fused CPU kernel, FBGEMM's
bucketize + TBE, inputs already split by tier, and the collection sharded for inference.

The reference is TorchRec's own float ``EmbeddingBagCollection`` holding the dequantized rows
(DROP rows zero), so keys, column order and values are all checked against TorchRec."""

import copy

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.planning.inference import shard_for_inference
from shark_torchrec.quant import (
    TIER_ORDER,
    RowwiseMixedEmbeddingBagCollection,
    RowwiseQuantConfig,
    Tier,
    assign_by_fractions,
    dequantize_rows,
    quantize_,
)

MIX = {"fp16": 0.2, "int8": 0.3, "int4": 0.2, "int2": 0.1, "drop": 0.2}
ROWS = {"t1": 40, "t2": 60, "t3": 30}


def _tables(pooling_t2=PoolingType.SUM):
    # f1 is read by t1 and t2; t2 also reads f2 (a table with two features); t3 reads f3.
    return [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=ROWS["t1"], feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=ROWS["t2"],
                               feature_names=["f1", "f2"], pooling=pooling_t2),
            EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=ROWS["t3"], feature_names=["f3"])]


def _batch(weighted: bool, B: int = 16, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = ["f3", "f1", "f2"]  # not the collection's order
    rows = {"f1": ROWS["t1"], "f2": ROWS["t2"], "f3": ROWS["t3"]}  # f1's ids valid in both tables
    lengths = torch.randint(0, 4, (len(keys) * B,), generator=g)
    values = torch.cat([torch.randint(0, rows[k], (int(n),), generator=g)
                        for k, n in zip(keys, lengths.view(len(keys), B).sum(1))])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def _reference_collection(ebc: EmbeddingBagCollection, assignment) -> EmbeddingBagCollection:
    """TorchRec's float collection with each row as the mixed collection stores it."""
    ref = copy.deepcopy(ebc)
    with torch.no_grad():
        for c in ref.embedding_bag_configs():
            w = ref.embedding_bags[c.name].weight
            deq = torch.zeros_like(w)
            for i, tier in enumerate(TIER_ORDER):
                rows = assignment.tiers[c.name].long() == i
                if rows.any():
                    deq[rows] = dequantize_rows(w[rows], tier, "cpu")
            w.copy_(deq)
    return ref


def _setup(weighted=False, pooling_t2=PoolingType.SUM, groups=1):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(pooling_t2), is_weighted=weighted)
    a = assign_by_fractions({n: torch.rand(r) for n, r in ROWS.items()},
                            {"t1": 8, "t2": 16, "t3": 8}, MIX)
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a, num_groups=groups)
    return ebc, a, m


def _assert_same(got, want) -> None:
    assert got.keys() == want.keys() == ["f1@t1", "f1@t2", "f2", "f3"]
    assert got.length_per_key() == want.length_per_key()
    for k, w in want.to_dict().items():
        g = got.to_dict()[k]
        assert torch.isfinite(g).all(), k
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# (TorchRec's float collection refuses per-id weights with MEAN pooling.)
@pytest.mark.parametrize("weighted,pooling_t2", [(False, PoolingType.SUM), (True, PoolingType.SUM),
                                                 (False, PoolingType.MEAN)])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("path", ["kernel", "fbgemm", "transformed"])
def test_each_table_reading_a_feature_has_its_own_output(weighted, pooling_t2, groups, path) -> None:
    ebc, a, m = _setup(weighted, pooling_t2, groups)
    kjt = _batch(weighted)
    want = _reference_collection(ebc, a)(kjt)
    if path == "transformed":
        got = m(m.input_transform(kjt))
    else:
        m.use_cpu_kernel = path == "kernel"
        got = m(kjt)
    _assert_same(got, want)
    # The two outputs of f1 are different tables' rows (not one table's twice).
    assert not torch.equal(got.to_dict()["f1@t1"], got.to_dict()["f1@t2"][:, :8])


def test_every_column_is_written_whatever_the_output_memory_held(monkeypatch) -> None:
    """The kernel writes into uninitialised memory: fill it with NaN and the values must not
    change."""
    ebc, a, m = _setup(groups=1)
    kjt = _batch(False)
    clean = m(kjt).values().clone()
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, **k: real_empty(*s, **k).fill_(float("nan"))
                        if not k.get("dtype") or k["dtype"].is_floating_point else real_empty(*s, **k))
    m._kernel_plans.clear()
    assert torch.equal(m(kjt).values(), clean)


@pytest.mark.parametrize("path", ["kernel", "fbgemm"])
def test_an_id_valid_in_one_table_of_a_shared_feature_but_not_the_other(path) -> None:
    _, _, m = _setup()
    m.use_cpu_kernel = path == "kernel"
    # id 50 of f1 is a row of t2 (60 rows) but not of t1 (40 rows).
    kjt = KeyedJaggedTensor.from_lengths_sync(["f1", "f2", "f3"], torch.tensor([50, 1, 2]),
                                              torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'f1': id 50 is outside table 't1' \(40 rows\)"):
        m(kjt)


def test_sharded_for_inference() -> None:
    ebc, a, m = _setup(weighted=False, groups=2)
    kjt = _batch(False)
    want = _reference_collection(ebc, a)(kjt)
    sharded, plan, _ = shard_for_inference(copy.deepcopy(m), world_size=2)
    assert {ps.ranks[0] for mp in plan.plan.values() for ps in mp.values()} == {0, 1}
    _assert_same(sharded(kjt), want)
    _assert_same(sharded(sharded.input_transform(kjt)), want)


def test_quantize_names_outputs_as_torchrec_does() -> None:
    """The issue's reproduction: two tables reading f1, every row INT8."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=10,
                                                            feature_names=["f1"]) for n in ("t1", "t2")])
    kjt = KeyedJaggedTensor(keys=["f1"], values=torch.tensor([0, 1]), lengths=torch.tensor([1, 1]))
    want = ebc(kjt)
    m = quantize_(copy.deepcopy(ebc), RowwiseQuantConfig(fractions={"int8": 1.0}))
    for kernel in (True, False):
        m.use_cpu_kernel = kernel
        got = m(kjt)
        assert got.keys() == want.keys() == ["f1@t1", "f1@t2"]
        # INT8 rows of U(-1/sqrt(10), 1/sqrt(10)) weights: within a 255th of the range.
        torch.testing.assert_close(got.values(), want.values().detach(), rtol=0, atol=2 / 255)
    assert all(bool((t.long() == TIER_ORDER.index(Tier.INT8)).all()) for t in m.assignment.tiers.values())
