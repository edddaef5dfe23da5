"""Pruning plans (criteria, protection, shared tables, JSON, validation) and applying them."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.pruning import (
    PruningPlan,
    ZeroFilledEmbeddingBagCollection,
    PrunedFeatureFilter,
    choose_plan,
    filter_features,
    prune_dlrm,
    prune_model,
    table_bytes,
)


def _tables(shared: bool = False):
    rows = [100, 200, 300, 400, 500]
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=r,
                                 feature_names=[f"cat_{i}"]) for i, r in enumerate(rows)]
    if shared:  # t0 serves cat_0 and cat_5
        tables[0] = EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=100,
                                       feature_names=["cat_0", "cat_5"])
    return tables


SCORES = {"cat_0": 0.1, "cat_1": 0.5, "cat_2": 0.05, "cat_3": 0.9, "cat_4": 0.3}


def test_keep_k_drops_the_lowest_scores() -> None:
    plan = choose_plan(SCORES, _tables(), keep=3, method="m")
    assert plan.dropped_features == ["cat_0", "cat_2"]
    assert plan.kept_features == ["cat_1", "cat_3", "cat_4"]
    assert plan.dropped_tables == ["t0", "t2"]
    assert plan.bytes_after == (200 + 400 + 500) * 4 * 4 == plan.bytes_before - (100 + 300) * 16


def test_drop_fraction_and_protected() -> None:
    plan = choose_plan(SCORES, _tables(), drop_fraction=0.6, protected=["cat_2"])
    # floor(0.6 * 5) = 3 of the unprotected fields, lowest first: cat_0, cat_4, cat_1.
    assert plan.dropped_features == ["cat_0", "cat_1", "cat_4"]
    assert "cat_2" in plan.kept_features
    with pytest.raises(ValueError, match="only 2 are not protected"):
        choose_plan(SCORES, _tables(), keep=1, protected=["cat_0", "cat_2", "cat_4"])


def test_drop_fraction_is_floored_exactly() -> None:
    """floor(0.58 * 50) is 29 (in floating point 0.58 * 50 is 28.999999999999996: one field
    too few was dropped)."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=10, feature_names=[f"f{i}"])
              for i in range(50)]
    plan = choose_plan({f"f{i}": float(i) for i in range(50)}, tables, drop_fraction=0.58)
    assert len(plan.dropped_features) == 29


def test_byte_target() -> None:
    tables = _tables()
    target = (400 + 500) * 16
    plan = choose_plan(SCORES, tables, byte_target=target)
    assert plan.bytes_after <= target
    # Lowest scores go first (cat_2, cat_0, cat_4, ...) until the target is met:
    # 1500 → 1200 → 1100 → 600 rows of 16 bytes.
    assert plan.dropped_features == ["cat_0", "cat_2", "cat_4"]
    with pytest.raises(ValueError, match="cannot be reached"):
        choose_plan(SCORES, tables, byte_target=10)


def test_score_share_drops_the_least_score_per_byte_saved() -> None:
    # score per byte (tables of 1,600..8,000 bytes): cat_2 < cat_4 < cat_0 < cat_3 < cat_1
    tables = _tables()
    total = sum(SCORES.values())
    plan = choose_plan(SCORES, tables, score_share=0.45 / total)
    assert plan.dropped_features == ["cat_0", "cat_2", "cat_4"]  # 0.05 + 0.3 + 0.1 = 0.45
    assert plan.criterion == {"score_share": 0.45 / total}
    # cat_4 (0.3) no longer fits; the next field by score per byte (cat_0) still does
    assert choose_plan(SCORES, tables, score_share=0.2 / total).dropped_features == ["cat_0", "cat_2"]
    assert choose_plan(SCORES, tables, score_share=0.2 / total, protected=["cat_2"]).dropped_features == ["cat_0"]
    # a zero score is always dropped; one field always stays
    zero = {f: 0.0 for f in SCORES}
    assert len(choose_plan(zero, tables, score_share=0.0).kept_features) == 1
    assert choose_plan({**SCORES, "cat_3": 0.0}, tables, score_share=0.0).dropped_features == ["cat_3"]
    with pytest.raises(ValueError, match="score_share must be in"):
        choose_plan(SCORES, tables, score_share=1.0)


def test_shared_table_is_removed_only_with_all_its_features() -> None:
    tables = _tables(shared=True)
    scores = dict(SCORES, cat_5=0.95)
    plan = choose_plan(scores, tables, keep=4)
    assert "cat_0" in plan.dropped_features and "t0" in plan.kept_tables  # cat_5 still uses t0
    plan2 = choose_plan(dict(scores, cat_5=0.01), tables, keep=4)
    assert set(plan2.dropped_features) == {"cat_5", "cat_2"} and "t0" in plan2.kept_tables
    plan3 = choose_plan(dict(scores, cat_5=0.01), tables, keep=3)
    assert "t0" in plan3.dropped_tables


def test_bad_inputs_are_refused() -> None:
    tables = _tables()
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        choose_plan(dict(SCORES, nope=1.0), tables, keep=2)
    with pytest.raises(ValueError, match="not finite for fields \\['cat_1'\\]"):
        choose_plan(dict(SCORES, cat_1=float("nan")), tables, keep=2)
    with pytest.raises(ValueError, match="keep must be in"):
        choose_plan(SCORES, tables, keep=0)
    with pytest.raises(ValueError, match="every field would be dropped"):
        PruningPlan(tables={t.name: list(t.feature_names) for t in tables},
                    table_bytes={t.name: table_bytes(t) for t in tables},
                    dropped_features=list(SCORES))
    with pytest.raises(ValueError, match="exactly one"):
        choose_plan(SCORES, tables, keep=2, drop_fraction=0.5)


def test_json_round_trip_and_validation(tmp_path: Path) -> None:
    tables = _tables()
    plan = choose_plan(SCORES, tables, keep=3, method="shark-mean", protected=["cat_4"])
    path = tmp_path / "plan.json"
    plan.save(str(path))
    again = PruningPlan.load(str(path))
    assert again == plan
    again.validate(tables)
    other = [EmbeddingBagConfig(name="t9", embedding_dim=4, num_embeddings=10, feature_names=["x"])]
    with pytest.raises(ValueError, match=r"fields unknown to the model: \['cat_0'"):
        again.validate(other)
    data = json.loads(path.read_text())
    data["dropped_features"] = ["cat_0", "ghost"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"plan\.json: PruningPlan: dropped_features names unknown fields \['ghost'\]"):
        PruningPlan.load(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON pruning plan"):
        PruningPlan.load(str(path))


# ------------------------------------------------------------------ applying plans
def _model(kind: str, tables):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables)
    for p in ebc.parameters():
        nn.init.normal_(p, std=0.3)
    kw = dict(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[8, 4],
              over_arch_layer_sizes=[8, 1])
    m = DLRM_DCN(dcn_num_layers=2, dcn_low_rank_dim=3, **kw) if kind == "dcn" else DLRM(**kw)
    for p in m.inter_arch.parameters():
        nn.init.normal_(p, std=0.3)
    return DLRMTrain(m)


def _batch(features, rows=100, B=32):
    cfg = SyntheticConfig.default(num_fields=len(features), num_informative=1, cardinality=rows,
                                  multi_hot_fields=2, max_hot=3)
    b = SyntheticClickDataset(cfg, B, 1).global_batch(0)
    return b


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_rebuilt_dlrm_equals_original_with_dropped_fields_zeroed(kind: str) -> None:
    tables = _tables()
    model = _model(kind, tables)
    plan = choose_plan(SCORES, tables, keep=3)
    pruned = prune_dlrm(model, plan)
    ebc = pruned.model.sparse_arch.embedding_bag_collection
    assert [t.name for t in ebc.embedding_bag_configs()] == ["t1", "t3", "t4"]
    assert pruned.model.sparse_arch.sparse_feature_names == ["cat_1", "cat_3", "cat_4"]
    for t in ["t1", "t3", "t4"]:  # surviving weights unchanged
        assert torch.equal(ebc.embedding_bags[t].weight,
                           model.model.sparse_arch.embedding_bag_collection.embedding_bags[t].weight)
    # Independent reference: the original model whose dropped tables are all zeros (their
    # pooled embeddings are then 0 and every interaction with them vanishes).
    reference = _model(kind, tables)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for t in plan.dropped_tables:
            reference.model.sparse_arch.embedding_bag_collection.embedding_bags[t].weight.zero_()
    batch = _batch(plan.features, rows=100)
    with torch.no_grad():
        _, (_, ref_logits, _) = reference(batch)
        _, (_, got_logits, _) = pruned(batch)
        _, (_, orig_logits, _) = model(batch)
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(orig_logits, ref_logits)  # the dropped fields did matter
    n_old = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_old


def test_zero_filled_mode_keeps_the_layout_for_any_model() -> None:
    tables = _tables()

    class Custom(nn.Module):  # not a DLRM: reads the KeyedTensor by position
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=tables)
            self.head = nn.Linear(20, 1)

        def forward(self, kjt):
            return self.head(self.ebc(kjt).values())

    torch.manual_seed(1)
    model = Custom()
    plan = choose_plan(SCORES, tables, keep=3)
    reference = Custom()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for t in plan.dropped_tables:
            reference.ebc.embedding_bags[t].weight.zero_()
    pruned = prune_model(model, plan, mode="auto")
    assert isinstance(pruned.ebc, ZeroFilledEmbeddingBagCollection)
    kjt = _batch(plan.features).sparse_features
    kt = pruned.ebc(kjt)
    assert kt.keys() == plan.features and kt.length_per_key() == [4] * 5
    assert torch.count_nonzero(kt.to_dict()["cat_0"]) == 0
    torch.testing.assert_close(pruned(kjt), reference(kjt))
    with pytest.raises(TypeError, match="rebuild"):
        prune_model(Custom(), plan, mode="rebuild")


def test_plan_filters_the_unpruned_models_batches() -> None:
    """The data still carries the dropped features: the plan's filter keeps exactly the kept
    ones in plan order (values and weights of each kept feature unchanged), and a rebuilt
    DLRM predicts the same from filtered and unfiltered batches."""
    import pickle

    tables = _tables()
    model = _model("dot", tables)
    plan = choose_plan(SCORES, tables, keep=3)
    batch = _batch(plan.features, rows=100)
    kjt = batch.sparse_features
    filtered = plan.filter_features(kjt)
    assert filtered.keys() == plan.kept_features == ["cat_1", "cat_3", "cat_4"]
    for f in plan.kept_features:  # independent reference: each feature's own jagged tensor
        assert torch.equal(filtered[f].values(), kjt[f].values())
        assert torch.equal(filtered[f].lengths(), kjt[f].lengths())
    transform = pickle.loads(pickle.dumps(PrunedFeatureFilter(plan)))
    assert transform(batch).sparse_features.keys() == plan.kept_features
    assert torch.equal(transform(batch).dense_features, batch.dense_features)
    pruned = prune_dlrm(model, plan)
    with torch.no_grad():
        _, (_, unfiltered_logits, _) = pruned(batch)
        _, (_, filtered_logits, _) = pruned(plan.filter_batch(batch))
    torch.testing.assert_close(unfiltered_logits, filtered_logits, rtol=0, atol=0)
    with pytest.raises(KeyError, match="cat_3"):
        filter_features(kjt.permute([0, 1, 2, 4]), plan.kept_features)  # cat_3 missing


def test_pruned_and_quantized_dlrm_takes_the_unfiltered_batches() -> None:
    """After pruning and quantize_, the data's batches (dropped features included) go straight
    in, as into TorchRec's own collections; the result equals the filtered batch's."""
    from shark_torchrec.quant import RowwiseQuantConfig, quantize_

    tables = _tables()
    model = _model("dot", tables)
    plan = choose_plan(SCORES, tables, keep=3)
    pruned = prune_dlrm(model, plan)
    quantize_(pruned, RowwiseQuantConfig(fractions={"fp16": 0.5, "int4": 0.5}))
    batch = _batch(plan.features, rows=100)
    with torch.no_grad():
        _, (_, unfiltered, _) = pruned(batch)
        _, (_, filtered, _) = pruned(plan.filter_batch(batch))
    torch.testing.assert_close(unfiltered, filtered, rtol=0, atol=0)


def test_byte_criteria_drop_only_what_frees_bytes() -> None:
    """A field whose shared table stays (a protected table-mate) frees nothing: the byte
    criteria drop tables whole (found by audit: score_share dropped such a field, using up the
    score allowance, and byte_target dropped one for nothing)."""
    def t(name, rows, feats):
        return EmbeddingBagConfig(name=name, embedding_dim=4, num_embeddings=rows, feature_names=feats)

    tables = [t("shared", 2000, ["a", "b"]), t("small1", 200, ["c"]), t("small2", 200, ["d"])]
    scores = {"a": 5.0, "b": 1.0, "c": 1.0, "d": 1.0}  # total 8
    plan = choose_plan(scores, tables, score_share=0.3, protected=["a"])  # allowance 2.4
    assert plan.dropped_features == ["c", "d"] and plan.bytes_after == 2000 * 16
    # unprotected: the shared table goes whole (a + b: 6 > 2.4, so not here) or not at all
    assert choose_plan(scores, tables, score_share=0.3).dropped_features == ["c", "d"]
    assert choose_plan(scores, tables, score_share=0.8).dropped_features == ["a", "b"]  # 6 of 6.4
    # byte_target: b cannot free its table while a is protected, so it stays
    plan = choose_plan({"a": 5.0, "b": 0.1, "c": 1.0, "d": 2.0}, tables, byte_target=2200 * 16, protected=["a"])
    assert plan.dropped_features == ["c"] and plan.bytes_after == 2200 * 16
    # a shared table goes by its best field's score (a: 5, after c, before d)
    plan = choose_plan({"a": 5.0, "b": 0.1, "c": 1.0, "d": 6.0}, tables, byte_target=200 * 16)
    assert plan.dropped_features == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"drop_fraction=0.8 needs dropping 3 of 4 fields but only 2"):
        choose_plan(scores, tables, drop_fraction=0.8, protected=["a", "b"])


def test_a_plan_for_another_size_of_the_tables_is_refused() -> None:
    plan = choose_plan(SCORES, _tables(), keep=3)
    bigger = [EmbeddingBagConfig(name=c.name, embedding_dim=64, num_embeddings=c.num_embeddings,
                                 feature_names=list(c.feature_names)) for c in _tables()]
    with pytest.raises(ValueError, match=r"table 't0' holds 25600 bytes, the plan's 1600"):
        plan.validate(bigger)
    plan.validate(_tables())
