"""A model holding the row-wise mixed collection traces with ``torch.fx`` (as TorchRec's
inference path traces a model to serve it) and its graph gives the eager model's output:
bit for bit, for any input key order, with the same errors for bad input."""

import pytest
import torch
import torchrec.fx
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant import RowwiseQuantConfig, quantize_
from shark_torchrec.quant.cpu_kernel import cpu_kernel_available

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="the fused CPU kernel is not built")

FEATURES = ["f0", "f1", "f2"]


def _tables(shared: bool = False):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f])
              for i, f in enumerate(FEATURES)]
    if shared:  # t_shared reads f0 too: outputs "f0@t0" and "f0@t_shared", as TorchRec names them
        tables.append(EmbeddingBagConfig(name="t_shared", embedding_dim=8, num_embeddings=30, feature_names=["f0"]))
    return tables


CONFIG = dict(fractions={"fp16": 0.2, "int8": 0.3, "int4": 0.3, "shared": 0.1, "drop": 0.1})


def _model(kind: str):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables())
    kw = dict(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
              over_arch_layer_sizes=[8, 1])
    model = DLRM_DCN(dcn_num_layers=2, dcn_low_rank_dim=4, **kw) if kind == "dcn" else DLRM(**kw)
    quantize_(model, RowwiseQuantConfig(**CONFIG))
    return model.eval()


def _batch(seed: int = 1, B: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * B,), generator=g)
    values = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    return torch.randn(B, 4, generator=g), KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths)


@pytest.mark.parametrize("trace", ["torch.fx", "torchrec.fx"])
@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_traced_dlrm_gives_the_eager_output(trace: str, kind: str) -> None:
    model = _model(kind)
    gm = torch.fx.symbolic_trace(model) if trace == "torch.fx" else torchrec.fx.symbolic_trace(model)
    leaves = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")]
    assert "_fused_lookup" in leaves  # the lookup is one leaf of the graph, its tensors the graph's
    with torch.no_grad():
        for seed in (1, 2):
            dense, kjt = _batch(seed)
            want = model(dense, kjt)
            assert torch.equal(gm(dense, kjt), want)
            assert torch.equal(gm(dense, kjt.permute([2, 0, 1])), want)  # any key order


def test_traced_collection_keeps_keys_dtype_and_errors() -> None:
    torch.manual_seed(0)
    ebc = quantize_(EmbeddingBagCollection(tables=_tables(shared=True)),
                    RowwiseQuantConfig(**CONFIG, output_dtype="fp16"))
    gm = torchrec.fx.symbolic_trace(ebc)
    _, kjt = _batch(4)
    want, got = ebc(kjt), gm(kjt)
    assert got.keys() == want.keys() == ["f0@t0", "f1", "f2", "f0@t_shared"]
    assert got.values().dtype == torch.float16 and torch.equal(got.values(), want.values())
    _, empty = _batch(3, B=0)
    assert gm(empty).values().shape == ebc(empty).values().shape == (0, 32)
    bad = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1, 2, 60]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="feature 'f2': id 60 is outside table 't2' \\(50 rows\\)"):
        gm(bad)
    with pytest.raises(ValueError, match="feature 'f0': id 40 is outside table 't_shared' \\(30 rows\\)"):
        gm(KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([40, 2, 3]), lengths=torch.tensor([1, 1, 1])))
    short = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="lengths add up to 3 ids, but 2 ids were given"):
        gm(short)


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_scripted_dlrm_gives_the_eager_output(kind: str, tmp_path) -> None:
    """TorchRec's inference path at the pinned version (``torchrec/inference/dlrm_predict.py``):
    fx-trace the model, then ``torch.jit.script`` the graph; saved and loaded with torch.jit."""
    model = _model(kind)
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(model))
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        for seed in (1, 2):
            dense, kjt = _batch(seed)
            want = model(dense, kjt)
            assert torch.equal(scripted(dense, kjt), want)
            assert torch.equal(loaded(dense, kjt), want)
            assert torch.equal(scripted(dense, kjt.permute([2, 0, 1])), want)
        bad = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1, 2, 60]), lengths=torch.tensor([1] * 3))
        with pytest.raises(torch.jit.Error, match="feature 'f2': id 60 is outside table 't2' \\(50 rows\\)"):
            loaded(torch.randn(1, 4), bad)


def test_scripted_collection_keeps_keys_and_dtype() -> None:
    torch.manual_seed(0)
    ebc = quantize_(EmbeddingBagCollection(tables=_tables(shared=True)),
                    RowwiseQuantConfig(**CONFIG, output_dtype="fp16"))
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(ebc))
    _, kjt = _batch(4)
    want, got = ebc(kjt), scripted(kjt)
    assert got.keys() == want.keys() == ["f0@t0", "f1", "f2", "f0@t_shared"]
    assert got.values().dtype == torch.float16 and torch.equal(got.values(), want.values())
    short = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(torch.jit.Error, match="lengths add up to 3 ids, but 2 ids were given"):
        scripted(short)
