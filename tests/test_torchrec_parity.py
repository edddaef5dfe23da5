"""The row-wise mixed collection against TorchRec's own quantized ``EmbeddingBagCollection``:
cases of TorchRec's ``torchrec/quant/tests/test_embedding_modules.py`` (public repository), each
rerun with every row of the mixed collection in the tier equivalent to TorchRec's weight dtype,
TorchRec's module being the reference, on both CPU paths (the fused kernel and FBGEMM's
bucketize + TBE).

Ported so far: ``test_ebc`` (data types, weight dtypes, output dtypes, permuted key order, a
MEAN table between SUM ones, per-table weight dtypes), ``test_shared_tables``,
``test_shared_features``, ``test_multiple_features``,
``test_create_on_meta_device_without_providing_weights``, ``test_save_load_state_dict`` (its
round trip), ``test_composability``, ``test_trace_and_script`` and per-table ``data_type``
reporting.  What does not apply, and why: ``test_multiple_kernels_per_ebc_table`` (virtual
tables in FBGEMM's DRAM key-value store, a library the CPU build lacks: TorchRec's own test
skips too); in ``test_trace_and_script``, that the graph's first node is TorchRec's
``_get_kjt_keys`` (the mixed collection's graph is one leaf, ``_fused_lookup``, which reads the
keys itself), and tracing FBGEMM's path (the traced forward is the fused kernel's, on CPU); the
``EmbeddingCollection`` cases (the mixed collection is a bag collection).
"""

import copy
from dataclasses import replace

import pytest
import torch
from torch.ao.quantization import PlaceholderObserver
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType, QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import ComputeKJTToJTDict, KeyedJaggedTensor
from torchrec.tensor_types import UIntXTensor

from shark_torchrec.quant import RowwiseQuantConfig, quantize_
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available
from shark_torchrec.quant.mixed_ebc import RowwiseMixedEmbeddingBagCollection

#: TorchRec's weight dtype -> the mixed collection's tier holding the same rows
TIER_OF = {torch.qint8: "int8", torch.half: "fp16", torch.quint4x2: "int4", torch.quint2x4: "int2"}
DATA_TYPE_OF = {torch.qint8: DataType.INT8, torch.half: DataType.FP16, torch.quint4x2: DataType.INT4}
PATHS = ["fused", "fbgemm"]


def _torchrec(ebc: EmbeddingBagCollection, weight, output, per_table=None) -> QuantEmbeddingBagCollection:
    ebc = copy.deepcopy(ebc)
    ebc.qconfig = QuantConfig(activation=PlaceholderObserver.with_args(dtype=output),
                              weight=PlaceholderObserver.with_args(dtype=weight),
                              per_table_weight_dtype=per_table)
    return QuantEmbeddingBagCollection.from_float(ebc)


def _mixed(ebc: EmbeddingBagCollection, weight, output, per_table=None, path="fused") -> RowwiseMixedEmbeddingBagCollection:
    pins = {t: TIER_OF[d] for t, d in (per_table or {}).items()}
    m = quantize_(copy.deepcopy(ebc), RowwiseQuantConfig(fractions={TIER_OF[weight]: 1.0}, table_overrides=pins,
                                                         output_dtype=output))
    if path == "fused" and not cpu_kernel_available():
        pytest.skip("the fused CPU kernel is not built")
    m.use_cpu_kernel = path == "fused"
    return m


def _assert_same(got, want) -> None:
    """As TorchRec's ``_asserting_same_embeddings``: the same keys, and per key the same shape
    and values (up to float rounding: 1e-6, where TorchRec's test allows 1e-8 between its own
    modules and 0.1 against the float one), in the same dtype.  (The keys' order may differ:
    TorchRec's quantized collection groups its output by (pooling, data type); the mixed
    collection keeps the float collection's order, see the README.)"""
    assert set(got.keys()) == set(want.keys())
    assert got.values().dtype == want.values().dtype
    a, b = got.to_dict(), want.to_dict()
    for key in want.keys():
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0,
                                   atol=1e-6 if b[key].dtype == torch.float32 else 1e-3, msg=key)


def _check(tables, features, weight=torch.qint8, output=torch.float, per_table=None) -> None:
    """TorchRec's ``_test_ebc``: the outputs, then the state dict (the float collection's keys
    a subset of the quantized one's; here also TorchRec's quantized keys a subset of ours, with
    the same tensors)."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables)
    theirs = _torchrec(ebc, weight, output, per_table)
    want = theirs(features)
    for path in PATHS:
        ours = _mixed(ebc, weight, output, per_table, path)
        _assert_same(ours(features), want)
        state = ours.state_dict()
        assert set(ebc.state_dict()) <= set(state)
        for key, value in theirs.state_dict().items():
            if isinstance(value, UIntXTensor):
                value = value.view(torch.uint8)
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("data_type", [DataType.FP32, DataType.FP16])
@pytest.mark.parametrize("weight", [torch.half, torch.qint8])
@pytest.mark.parametrize("output", [torch.half, torch.float])
@pytest.mark.parametrize("permute_order", [False, True])
def test_ebc(data_type, weight, output, permute_order) -> None:
    t1 = EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=10, feature_names=["f1"], data_type=data_type)
    t1_mean = replace(t1, name="t1_mean", pooling=PoolingType.MEAN, embedding_dim=32)
    t2 = replace(t1, name="t2", feature_names=["f2"])
    features = (KeyedJaggedTensor(keys=["f2", "f1"], values=torch.as_tensor([1, 3, 0, 2]),
                                  lengths=torch.as_tensor([2, 0, 1, 1])) if permute_order else
                KeyedJaggedTensor(keys=["f1", "f2"], values=torch.as_tensor([0, 2, 1, 3]),
                                  lengths=torch.as_tensor([1, 1, 2, 0])))
    # The key for grouping tables is (pooling, data_type): a different one in the middle.
    _check([t1, t1_mean, t2], features, weight, output)
    for per_table in ({"t1": torch.quint4x2, "t2": torch.qint8}, {"t1": torch.qint8, "t2": torch.quint4x2}):
        _check([t1, t1_mean, t2], features, weight, output, per_table)


def test_shared_tables() -> None:
    t1 = EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=10, feature_names=["f1", "f2"])
    _check([t1], KeyedJaggedTensor(keys=["f1", "f2"], values=torch.as_tensor([0, 1]), lengths=torch.as_tensor([1, 1])))


def test_shared_features() -> None:
    """Two tables reading one feature: one output per (feature, table), ``f1@t1``, ``f1@t2``."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=10, feature_names=["f1"])
              for n in ("t1", "t2")]
    _check(tables, KeyedJaggedTensor(keys=["f1"], values=torch.as_tensor([0, 1]), lengths=torch.as_tensor([1, 1])))


def test_multiple_features() -> None:
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=10, feature_names=["f1", "f2"]),
              EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=10, feature_names=["f3"])]
    _check(tables, KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.as_tensor([0, 1, 2]),
                                     lengths=torch.as_tensor([1, 1, 1])))


def test_data_type_per_table() -> None:
    """``embedding_bag_configs()`` reports each table's data type as TorchRec's does (a table in
    one tier), and the most precise tier's for a mixed table."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=10, feature_names=[f])
              for n, f in (("t1", "f1"), ("t2", "f2"))]
    ebc = EmbeddingBagCollection(tables=tables)
    per_table = {"t1": torch.quint4x2, "t2": torch.qint8}
    theirs = {c.name: c.data_type for c in _torchrec(ebc, torch.qint8, torch.float, per_table).embedding_bag_configs()}
    ours = {c.name: c.data_type for c in _mixed(ebc, torch.qint8, torch.float, per_table).embedding_bag_configs()}
    assert ours == theirs == {"t1": DataType.INT4, "t2": DataType.INT8}
    mixed = quantize_(copy.deepcopy(ebc), RowwiseQuantConfig(fractions={"fp16": 0.3, "int4": 0.7}))
    assert {c.data_type for c in mixed.embedding_bag_configs()} == {DataType.FP16}


def test_create_on_meta_device_without_providing_weights() -> None:
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=10, feature_names=["f1"])]
    QuantEmbeddingBagCollection(tables, is_weighted=False, device=torch.device("meta"))  # TorchRec's
    meta = quantize_(EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                     RowwiseQuantConfig(fractions={"int8": 1.0}))
    assert isinstance(meta, RowwiseMixedEmbeddingBagCollection)
    assert [c.data_type for c in meta.embedding_bag_configs()] == [DataType.INT8]
    with pytest.raises(ValueError, match=r"\['t1'\] are on the meta device.*byte budget"):
        quantize_(EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                  RowwiseQuantConfig(budget_fraction=0.5))


@pytest.mark.parametrize("weight", [torch.half, torch.qint8])
@pytest.mark.parametrize("output", [torch.half, torch.float])
def test_save_load_state_dict(weight, output) -> None:
    """TorchRec's round trip: a second collection loads the first's state dict and then holds
    the same state and gives the same output (the second converted from other weights)."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=10, feature_names=["f1"])
              for n in ("t1", "t2")]
    features = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.as_tensor([0, 1]), lengths=torch.as_tensor([1, 1]))
    torch.manual_seed(0)
    first = _mixed(EmbeddingBagCollection(tables=tables), weight, output)
    second = _mixed(EmbeddingBagCollection(tables=tables), weight, output)
    second.load_state_dict(first.state_dict())
    for key, value in first.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(second.state_dict()[key], value, rtol=0, atol=0)
    _assert_same(second(features), first(features))
    assert second(features).values().dtype == output


@pytest.mark.parametrize("data_type", [DataType.FP32, DataType.FP16])
@pytest.mark.parametrize("weight", [torch.half, torch.qint8])
@pytest.mark.parametrize("output", [torch.half, torch.float])
def test_composability(data_type, weight, output) -> None:
    """A model holding the collection: the float model's state-dict keys are a subset of the
    quantized model's, and the quantized model loads its own state."""

    class TestModel(torch.nn.Module):
        def __init__(self, ebc) -> None:
            super().__init__()
            self.ebc = ebc
            self.over_arch = torch.nn.Linear(16, 1)

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            out = self.ebc.forward(kjt).to_dict()
            return self.over_arch(torch.cat([out[k] for k in kjt.keys()], dim=0).float())

    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=10, feature_names=[f], data_type=data_type)
              for n, f in (("t1", "f1"), ("t2", "f2"))]
    ebc = EmbeddingBagCollection(tables=tables)
    model = TestModel(ebc)
    before = model.state_dict()
    model.ebc = _mixed(ebc, weight, output)
    state = model.state_dict()
    assert set(before) <= set(state)
    model.load_state_dict(state)
    features = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.as_tensor([0, 1]), lengths=torch.as_tensor([1, 1]))
    assert model(features).shape == (2, 1)


def test_trace_and_script() -> None:
    """Traced with ``torchrec.fx`` (ComputeKJTToJTDict a leaf, as TorchRec's test traces) and
    scripted: the same keys, values and offsets per key as the eager collection."""
    if not cpu_kernel_available():
        pytest.skip("the fused CPU kernel is not built")
    from torchrec.fx import symbolic_trace

    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=10, feature_names=["f1"],
                                 data_type=DataType.FP16) for n in ("t1", "t2")]
    m = _mixed(EmbeddingBagCollection(tables=tables), torch.half, torch.half)
    gm = symbolic_trace(m, leaf_modules=[ComputeKJTToJTDict.__name__])
    assert any(n.op == "call_function" for n in gm.graph.nodes)
    features = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.as_tensor([0, 1]), lengths=torch.as_tensor([1, 1]))
    original, traced, scripted = m(features), gm(features), torch.jit.script(gm)(features)
    for out in (traced, scripted):
        assert out.keys() == original.keys() == ["f1@t1", "f1@t2"]
        torch.testing.assert_close(out.values(), original.values(), rtol=0, atol=0)
        assert out.offset_per_key() == original.offset_per_key()
