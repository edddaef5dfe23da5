"""Export / load of a compressed DLRM: identical predictions, weights_only loading, and bad
files refused with clear errors."""

import json
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.export import ExportError, export_model, load_export
from shark_torchrec.pruning import choose_plan
from shark_torchrec.quant import RowwiseQuantConfig, quantize_

CFG = SyntheticConfig.default(num_fields=4, num_informative=2, cardinality=400, multi_hot_fields=1,
                              max_hot=3, seed=2)


MIX = {"fp16": .2, "int8": .3, "int4": .3, "drop": .2}


def _model(kind="dot", seed=0, fractions=MIX):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=400, feature_names=[f])
              for i, f in enumerate(CFG.feature_names)]
    kw = dict(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
              dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    m = DLRM_DCN(dcn_num_layers=2, dcn_low_rank_dim=4, **kw) if kind == "dcn" else DLRM(**kw)
    model = DLRMTrain(m)
    quantize_(model, RowwiseQuantConfig(fractions=fractions),
              priorities={f"t{i}": torch.rand(400) for i in range(4)})
    model.eval()
    return model, tables


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_round_trip_gives_identical_predictions(tmp_path: Path, kind: str) -> None:
    model, tables = _model(kind)
    plan = choose_plan({f: float(i) for i, f in enumerate(CFG.feature_names)}, tables, keep=4)
    path = str(tmp_path / "model.pt")
    export_model(model, path, pruning_plan=plan, metadata={"test_auc": 0.75})
    loaded, info = load_export(path, expect_features=CFG.feature_names, expect_dense_in_features=13)
    batch = SyntheticClickDataset(CFG, 64, 1).global_batch(0)
    with torch.no_grad():
        assert torch.equal(loaded(batch)[1][1], model(batch)[1][1])
    assert info["metadata"] == {"test_auc": 0.75} and '"dropped_features": []' in info["pruning_plan"]
    assert info["model"]["kind"] == ("dlrm_dcn" if kind == "dcn" else "dlrm")


def test_a_model_with_shared_rows_round_trips(tmp_path: Path) -> None:
    """SHARED rows (their table's rows per tier add up to its rows less the shared ones plus its
    centroids): the export loads and predicts identically (the load check once counted the
    rows per tier against the table's rows and refused every such export)."""
    model, _ = _model(fractions={"fp16": .3, "int8": .3, "shared": .4})
    assert model.model.sparse_arch.embedding_bag_collection.layout.shared
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    loaded, _ = load_export(path)
    batch = SyntheticClickDataset(CFG, 64, 1).global_batch(0)
    with torch.no_grad():
        assert torch.equal(loaded(batch)[1][1], model(batch)[1][1])


def test_bad_exports_are_refused(tmp_path: Path) -> None:
    model, _ = _model()
    path = tmp_path / "model.pt"
    export_model(model, str(path))
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"truncated\.pt: not a readable shark-torchrec export"):
        load_export(str(tmp_path / "truncated.pt"))
    torch.save({"format": "something/else"}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match=r"other\.pt: not a shark-torchrec export"):
        load_export(str(tmp_path / "other.pt"))
    with pytest.raises(ExportError, match=r"reads features \['cat_0', 'cat_1', 'cat_2', 'cat_3'\], expected \['a'\]"):
        load_export(str(path), expect_features=["a"])
    with pytest.raises(ExportError, match="takes 13 dense inputs, expected 7"):
        load_export(str(path), expect_dense_in_features=7)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "shark-torchrec/export/v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ExportError, match="not a readable"):  # weights_only: no arbitrary pickles
        load_export(str(tmp_path / "evil.pt"))
    # Weights of another model under this model's description.
    payload = torch.load(path, weights_only=False)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "over_arch" not in k}
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ExportError, match="weights do not match"):
        load_export(str(tmp_path / "mismatch.pt"))


def _bad_payloads():
    """(name, change to a valid payload, what the error must say) for fields that unpickle but
    are malformed."""
    def model(**changes):
        def change(p):
            desc = json.loads(p["model"])
            desc.update(changes)
            p["model"] = json.dumps({k: v for k, v in desc.items() if v is not None})
        return change

    def drop_features(p):
        desc = json.loads(p["model"])
        del desc["embedding"]["tables"][0]["features"]
        p["model"] = json.dumps(desc)

    return [
        ("model_not_json", lambda p: p.update(model="{not json"), r"field 'model' is not valid JSON"),
        ("model_a_number", lambda p: p.update(model="5"), r"field 'model' must be a JSON object, got int"),
        ("model_not_text", lambda p: p.update(model=7), r"field 'model' must be JSON text, got int"),
        ("model_lacks_keys", model(embedding=None, dense_in_features=None),
         r"field 'model' lacks \['dense_in_features', 'embedding'\]"),
        ("model_unknown_kind", model(kind="mlp"), r"field 'model': kind must be one of"),
        ("model_bad_sizes", model(dense_arch_layer_sizes="16,8"),
         r"field 'model': dense_arch_layer_sizes must be a non-empty list"),
        ("model_bad_layout", drop_features,
         r"field 'model': embedding is not a valid .*KeyError: 'features'"),
        ("metadata_not_json", lambda p: p.update(metadata="{"), r"field 'metadata' is not valid JSON"),
        ("state_dict_a_list", lambda p: p.update(state_dict=[1, 2]),
         r"field 'state_dict' must be a mapping of names to tensors, got list"),
        ("plan_not_text", lambda p: p.update(pruning_plan=3), r"field 'pruning_plan' must be JSON text"),
        ("plan_not_json", lambda p: p.update(pruning_plan="{dropped: [a"), r"field 'pruning_plan' is not valid JSON"),
        ("plan_a_list", lambda p: p.update(pruning_plan="[1]"), r"field 'pruning_plan' must be a JSON object"),
        ("nan_dense_weight", _nan_weight, r"field 'state_dict': weight '.*over_arch.*' is not finite"),
    ]


def _nan_weight(p):
    key = next(k for k in p["state_dict"] if "over_arch" in k and k.endswith("weight"))
    w = p["state_dict"][key].clone()
    w[0, 0] = float("nan")
    p["state_dict"][key] = w


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.pt"
    export_model(_model()[0], str(path))
    return path


@pytest.mark.parametrize("name,change,message", _bad_payloads(), ids=[c[0] for c in _bad_payloads()])
def test_malformed_fields_are_refused_before_building(tmp_path: Path, exported: Path, monkeypatch,
                                                      name, change, message) -> None:
    payload = torch.load(exported, weights_only=False)
    change(payload)
    bad = tmp_path / f"{name}.pt"
    torch.save(payload, bad)

    def no_build(*_):
        raise AssertionError("a model was built from a malformed export")

    monkeypatch.setattr("shark_torchrec.export._build", no_build)
    with pytest.raises(ExportError, match=rf"{name}\.pt: {message}"):
        load_export(str(bad))
