"""Field pruning by mean replacement (``prune_dlrm(..., means=...)``): a constant field is
pruned with no change to any output; any other field reads exactly its mean; the pruned
model rebuilds from its config, exports and loads."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.export import export_model, load_export
from shark_torchrec.pruning import choose_plan, prune_dlrm
from shark_torchrec.pruning.mean_fill import MeanFilledSparseArch, field_means
from shark_torchrec.pruning.sharded import pruned_config
from shark_torchrec.quant import RowwiseQuantConfig, quantize_
from shark_torchrec.training.model import DLRMConfig, build_dlrm_train

CFG = SyntheticConfig.default(num_fields=5, num_informative=2, cardinality=50, multi_hot_fields=2,
                              max_hot=3, seed=4)
FEATURES = list(CFG.feature_names)


def _config(kind: str) -> DLRMConfig:
    return DLRMConfig(feature_names=FEATURES, num_embeddings_per_feature=[50] * 5, embedding_dim=4,
                      dense_in_features=13, dense_arch_layer_sizes=(8, 4), over_arch_layer_sizes=(8, 1),
                      interaction="dcn" if kind == "dcn" else "dot", dcn_num_layers=2, dcn_low_rank_dim=3)


def _model(kind: str) -> DLRMTrain:
    model = build_dlrm_train(_config(kind), torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    model.eval()
    return model


def _batch(offset: int = 0, B: int = 64):
    return SyntheticClickDataset(CFG, B, 1, batch_offset=offset).global_batch(0)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)[1][1]


def _ebc(model: DLRMTrain):
    return model.model.sparse_arch.embedding_bag_collection


def _plan(dropped):
    scores = {f: (0.0 if f in dropped else 1.0 + i) for i, f in enumerate(FEATURES)}
    return choose_plan(scores, _config("dot").tables(), keep=len(FEATURES) - len(dropped))


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_a_constant_field_is_pruned_with_no_change_to_any_output(kind: str) -> None:
    model = _model(kind)
    # cat_1 is multi-hot in the data; make its pooled embedding constant: every bag gets one id
    # (the data's lengths kept for the others) and every row of its table is the same vector.
    batch = _batch()
    kjt = batch.sparse_features
    per_key = kjt.to_dict()
    B = kjt.stride()
    per_key["cat_1"] = KeyedJaggedTensor.from_lengths_sync(
        keys=["cat_1"], values=torch.arange(B) % 50, lengths=torch.ones(B, dtype=torch.long))["cat_1"]
    kjt = KeyedJaggedTensor.from_jt_dict(per_key)
    batch = type(batch)(dense_features=batch.dense_features, sparse_features=kjt, labels=batch.labels)
    with torch.no_grad():
        _ebc(model).embedding_bags["t_cat_1"].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]).expand(50, 4))
    plan = _plan(["cat_1"])
    means = field_means(_ebc(model), [kjt], ["cat_1"])
    pruned = prune_dlrm(model, plan, means)
    assert isinstance(pruned.model.sparse_arch, MeanFilledSparseArch)
    assert [t.name for t in _ebc(pruned).embedding_bag_configs()] == [f"t_{f}" for f in FEATURES if f != "cat_1"]
    assert torch.equal(_logits(pruned, batch), _logits(model, batch))  # bit for bit
    # Removing the field instead moves the outputs: DLRM's interaction loses the constant.
    removed = prune_dlrm(model, plan)
    assert not torch.allclose(_logits(removed, batch), _logits(model, batch), atol=1e-4)
    # The original model is left as it was; every dense weight is carried over unchanged.
    assert "t_cat_1" in _ebc(model).embedding_bags
    for k, v in pruned.state_dict().items():
        if ".embedding_bags." not in k and "pruned_field_means" not in k:
            assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_a_pruned_field_reads_its_mean_in_the_interaction(kind: str) -> None:
    """Reference: TorchRec's own archs of the original model, the dropped fields' pooled
    embeddings overwritten by the given constants."""
    model = _model(kind)
    batch = _batch(offset=3)
    plan = _plan(["cat_0", "cat_3"])
    means = {"cat_0": torch.tensor([1.0, 2.0, -3.0, 0.5]), "cat_3": torch.tensor([-0.1, 0.2, 0.3, 0.4])}
    pruned = prune_dlrm(model, plan, means)
    dlrm = model.model
    with torch.no_grad():
        pooled = _ebc(model)(batch.sparse_features).to_dict()
        B = batch.dense_features.shape[0]
        for f, m in means.items():
            pooled[f] = m.expand(B, 4)
        sparse = torch.stack([pooled[f] for f in FEATURES], dim=1)
        dense = dlrm.dense_arch(batch.dense_features)
        reference = dlrm.over_arch(dlrm.inter_arch(dense_features=dense, sparse_features=sparse)).squeeze(-1)
    torch.testing.assert_close(_logits(pruned, batch), reference, rtol=0, atol=1e-6)


def test_field_means_is_the_mean_pooled_embedding() -> None:
    model = _model("dot")
    batches = [_batch(offset=i, B=32).sparse_features for i in range(3)]
    got = field_means(_ebc(model), iter(batches), ["cat_2", "cat_4"], max_batches=2)
    for f in ["cat_2", "cat_4"]:
        w = _ebc(model).embedding_bags[f"t_{f}"].weight
        pooled = [F.embedding_bag(b[f].values(), w, b[f].offsets()[:-1], mode="sum") for b in batches[:2]]
        torch.testing.assert_close(got[f], torch.cat(pooled).double().mean(0).float(), rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="does not output"):
        field_means(_ebc(model), batches, ["nope"])


def test_pruning_twice_keeps_the_first_constants_and_rebuilds_from_its_config(tmp_path: Path) -> None:
    model = _model("dot")
    first = prune_dlrm(model, _plan(["cat_0"]), {"cat_0": torch.ones(4)})
    config = pruned_config(_config("dot"), _plan(["cat_0"]), mean_filled=True)
    plan2 = choose_plan({f: float(i) for i, f in enumerate(config.feature_names)}, config.tables(), keep=3)
    second = prune_dlrm(first, plan2, {"cat_1": torch.full((4,), 2.0)})
    arch = second.model.sparse_arch
    assert arch.pruned_features == ["cat_0", "cat_1"] and arch.sparse_feature_names == FEATURES
    assert torch.equal(arch.means()["cat_0"], torch.ones(4))
    # The config of the twice-pruned model builds the same model (constants from its state).
    config2 = pruned_config(config, plan2, mean_filled=True)
    assert config2.mean_filled == ["cat_0", "cat_1"]
    rebuilt = build_dlrm_train(config2, torch.device("cpu"), 0, embedding_device=torch.device("cpu"))
    rebuilt.load_state_dict(second.state_dict())
    rebuilt.eval()
    batch = _batch(offset=5)
    assert torch.equal(_logits(rebuilt, batch), _logits(second, batch))
    with pytest.raises(ValueError, match="already read their means"):
        prune_dlrm(first, plan2)
    with pytest.raises(ValueError, match="already read their means"):
        pruned_config(config, plan2)
    with pytest.raises(ValueError, match="no mean given"):
        prune_dlrm(model, _plan(["cat_0"]), {})
    # Nothing dropped: a plain DLRM, as its config says.
    assert not isinstance(prune_dlrm(model, _plan([]), {}).model.sparse_arch, MeanFilledSparseArch)
    assert pruned_config(_config("dot"), _plan([]), mean_filled=True).interaction_features == ()
    # Quantized and exported, it loads and predicts the same.
    quantize_(second, RowwiseQuantConfig(fractions={"int8": 1.0}))
    second.eval()
    export_model(second, str(tmp_path / "m.pt"))
    loaded, info = load_export(str(tmp_path / "m.pt"), expect_features=["cat_2", "cat_3", "cat_4"])
    assert info["model"]["interaction_features"] == FEATURES
    assert torch.equal(_logits(loaded, batch), _logits(second, batch))
    # ... and traces with torch.fx (as TorchRec's inference path serves a model), predicting the same
    gm = torch.fx.symbolic_trace(loaded.model)
    scripted = torch.jit.script(gm)  # then TorchScript, as TorchRec's inference path serves it
    with torch.no_grad():
        assert torch.equal(gm(batch.dense_features, batch.sparse_features).squeeze(-1), _logits(loaded, batch))
        assert torch.equal(scripted(batch.dense_features, batch.sparse_features).squeeze(-1), _logits(loaded, batch))


def test_bad_means_are_refused() -> None:
    model = _model("dot")
    with pytest.raises(ValueError, match="cat_0.*not finite"):
        prune_dlrm(model, _plan(["cat_0"]), {"cat_0": torch.tensor([0.0, float("nan"), 0.0, 0.0])})
    with pytest.raises(ValueError, match="cat_0.*3 values"):
        prune_dlrm(model, _plan(["cat_0"]), {"cat_0": torch.zeros(3)})
    with pytest.raises(ValueError, match="not pruned fields"):
        MeanFilledSparseArch(_ebc(model), FEATURES, {"cat_0": torch.zeros(4)})
