"""Quantization-loss attribution: the simulated tiers read exactly as the quantized collection
does, and each group's recovered AUC is measured on the same rows."""

import copy

import numpy as np
import pytest
import torch

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.evaluation import auc
from shark_torchrec.quant import TIER_ORDER, RowwiseQuantConfig, Tier, quantize_
from shark_torchrec.quant.attribution import attribute_quantization_loss, simulated_tiers
from test_quantize_api import _dlrm  # a DLRM with three 300 x 8 tables t0-t2

CFG = SyntheticConfig.default(num_fields=3, num_informative=2, cardinality=300, multi_hot_fields=1,
                              max_hot=3, seed=3)


def _setup():
    model = _dlrm().eval()
    mixed = copy.deepcopy(model)
    priorities = {f"t{i}": torch.rand(300, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    quantize_(mixed, RowwiseQuantConfig(fractions={"int8": 0.2, "int4": 0.3, "int2": 0.3, "drop": 0.2},
                                        table_overrides={"t2": "exclude"}), priorities=priorities)
    mixed.eval()
    tiers = mixed.model.sparse_arch.embedding_bag_collection.assignment.tiers
    batches = [SyntheticClickDataset(CFG, 128, 1).global_batch(i) for i in range(4)]
    return model, mixed, tiers, batches


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b)[1][1].float() for b in batches])


def test_simulated_tiers_read_as_the_quantized_collection_and_restore_the_weights() -> None:
    model, mixed, tiers, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with simulated_tiers(model, tiers):
        torch.testing.assert_close(_logits(model, batches), _logits(mixed, batches), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Keeping every row of the quantized tables in fp32 gives the float model back exactly.
    keep = {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in tiers.items()}
    with simulated_tiers(model, tiers, keep_fp32=keep):
        assert torch.equal(_logits(model, batches), _logits(_reload(before), batches))


def _reload(state):
    m = _dlrm().eval()
    m.load_state_dict(state)
    return m


def test_attribution_reports_the_recovered_auc_of_each_tier_and_table() -> None:
    model, mixed, tiers, batches = _setup()
    labels = torch.cat([b.labels for b in batches]).float()
    report = attribute_quantization_loss(model, tiers, lambda m: _logits(m, batches), labels,
                                         bootstrap=200, seed=0)
    y = labels.numpy()
    auc_fp32 = auc(_logits(model, batches).numpy(), y)
    auc_q = auc(_logits(mixed, batches).numpy(), y)
    assert report["auc"]["fp32"] == pytest_approx(auc_fp32)
    assert report["auc"]["quantized"] == pytest_approx(auc_q)
    assert report["fp32"]["recovered"] == pytest_approx(auc_fp32 - auc_q)
    # One entry per tier actually used (FP32 is the excluded table t2), with its row count.
    counts = {TIER_ORDER[i].value: int(sum((t.long() == i).sum() for t in tiers.values()))
              for i in range(len(TIER_ORDER))}
    assert set(report["tiers"]) == {k for k, v in counts.items() if v and k != Tier.FP32.value}
    for name, entry in report["tiers"].items():
        assert entry["rows"] == counts[name]
        lo, hi = entry["ci"]
        assert lo <= entry["recovered"] <= hi
    # Table t2 is stored in fp32: keeping it in fp32 changes nothing.
    assert report["tables"]["t2"]["recovered"] == 0.0
    # Dropping rows of table t0 back to fp32, by hand: the reference for its entry.
    keep = {"t0": torch.ones(300, dtype=torch.bool)}
    with simulated_tiers(model, tiers, keep_fp32=keep):
        want = auc(_logits(model, batches).numpy(), y) - auc_q
    assert report["tables"]["t0"]["recovered"] == pytest_approx(want)
    assert np.isfinite(report["tables"]["t1"]["recovered"])


def pytest_approx(x):
    return pytest.approx(x, abs=1e-9)


def test_simulated_rows_are_fitted_as_the_assignment_stored_them() -> None:
    """With least-squares-fitted rows the simulation reads each row as the collection built with
    that fit does (it used to dequantize with min/max whatever the assignment's fit)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=20,
                                                            feature_names=["f"])])
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(20), torch.ones(20, dtype=torch.long))
    q = quantize_(copy.deepcopy(ebc), RowwiseQuantConfig(fractions={"int2": 1.0}, row_fit="lsq"))
    with torch.no_grad():
        real = q(kjt)["f"]
        with simulated_tiers(ebc, q.assignment.tiers, row_fit=q.assignment.row_fit) as m:
            torch.testing.assert_close(m(kjt)["f"], real, rtol=1e-6, atol=1e-6)
        with simulated_tiers(ebc, q.assignment.tiers) as m:  # min/max rows: another model
            assert not torch.allclose(m(kjt)["f"], real, atol=1e-3)


def test_shared_rows_read_as_their_centroids_and_bad_tier_indices_are_refused() -> None:
    """With the SHARED tier (the default policy) the simulation reads each SHARED row as its
    centroid (``shared=assignment.shared``): the quantized model's logits.  Without the
    centroids it says so (a KeyError before); a tier index outside TIER_ORDER (read as fp32,
    silently, before) is an error naming the table and row."""
    model = _dlrm().eval()
    mixed = copy.deepcopy(model)
    priorities = {f"t{i}": torch.rand(300, generator=torch.Generator().manual_seed(i)) ** 3 for i in range(3)}
    quantize_(mixed, RowwiseQuantConfig(budget_fraction=0.3, tiers=("fp16", "int8", "int4", "int2", "shared"),
                                        row_alignment=1), priorities=priorities)
    mixed.eval()
    a = mixed.model.sparse_arch.embedding_bag_collection.assignment
    assert any(bool((t == TIER_ORDER.index(Tier.SHARED)).any()) for t in a.tiers.values())
    batches = [SyntheticClickDataset(CFG, 128, 1).global_batch(i) for i in range(4)]
    with simulated_tiers(model, a.tiers, shared=a.shared, row_fit=a.row_fit):
        torch.testing.assert_close(_logits(model, batches), _logits(mixed, batches), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"has SHARED rows: pass the assignment's centroids"):
        with simulated_tiers(model, a.tiers):
            pass
    bad = {n: t.clone() for n, t in a.tiers.items()}
    bad["t1"][7] = 9
    with pytest.raises(ValueError, match=r"table 't1': row 7 has tier index 9"):
        with simulated_tiers(model, bad, shared=a.shared):
            pass
