"""Row priorities: the update rule against a naive dense reference, lazy decay with
renormalisation, shared tables, bad ids, hooks and state round trips."""

import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRMTrain

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.importance import RowPriority

CFG = SyntheticConfig.default(num_fields=3, num_informative=1, cardinality=40,
                              multi_hot_fields=1, max_hot=4, seed=4)


def _tables(shared=False):
    if shared:
        return [EmbeddingBagConfig(name="t01", embedding_dim=4, num_embeddings=40,
                                   feature_names=["cat_0", "cat_1"]),
                EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=40, feature_names=["cat_2"])]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=40, feature_names=[f"cat_{i}"])
            for i in range(3)]


def _naive(tables, batches, alpha, beta, gamma):
    """p ← γ·p + Σ occurrences (α | β), every row decayed every step, in float64."""
    feat = {f: t.name for t in tables for f in t.feature_names}
    p = {t.name: torch.zeros(t.num_embeddings, dtype=torch.float64) for t in tables}
    for b in batches:
        for v in p.values():
            v.mul_(gamma)
        d = b.sparse_features.to_dict()
        for f, jt in d.items():
            for n, bag in enumerate(torch.split(jt.values(), jt.lengths().tolist())):
                for i in bag.tolist():
                    p[feat[f]][i] += alpha if b.labels[n] > 0.5 else beta
    return p


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.3])  # 0.3: renormalises after ~50 steps
def test_priorities_equal_naive_reference(shared: bool, gamma: float) -> None:
    tables = _tables(shared)
    batches = [SyntheticClickDataset(CFG, 16, 80).global_batch(g) for g in range(80)]
    rp = RowPriority(tables, alpha=1.0, beta=0.25, gamma=gamma)
    for b in batches:
        rp.update(b.sparse_features, b.labels)
    got = rp.priorities()
    ref = _naive(tables, batches, 1.0, 0.25, gamma)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-12)
    assert rp.memory_bytes == 8 * 40 * len(tables)
    if gamma == 0.3:
        assert rp._log_scale["priority"] < 80 * -math.log(0.3)  # it did renormalise


@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_hot_row_counts_every_occurrence_past_float32s_integers(monkeypatch, use_kernel: bool) -> None:
    """Every occurrence adds its own increment: a row already counted 2^24 times (a hot row of
    a long run) still counts each one more (float32 counts stopped at 2^24), by the kernel and
    by the plain torch path."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    import shark_torchrec.importance.row_priority as R

    if use_kernel and not R.cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    monkeypatch.setattr(R, "cpu_kernel_available", lambda: use_kernel)
    tables = _tables()
    rp = RowPriority(tables, alpha=1.0, beta=0.25, gamma=1.0)
    state = rp.state_dict()
    state["values"]["priority"]["t0"][0] = 2.0 ** 24
    rp.load_state_dict(state)
    kjt = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([0, 0, 0, 0, 5]),
                                              torch.tensor([2, 1, 0, 0, 1, 1]))
    for _ in range(3):
        rp.update(kjt, torch.tensor([1.0, 0.0]))
    assert float(rp.priorities()["t0"][0]) == 2.0 ** 24 + 3 * (2 * 1.0 + 0.25)


def test_bad_id_names_feature_and_id() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rp = RowPriority(_tables())
    kjt = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([1, 40, 3]),
                                              torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'cat_1': id 40 is outside table 't1' \(40 rows\)"):
        rp.update(kjt, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="gamma"):
        RowPriority(_tables(), gamma=0.0)


def test_a_refused_batch_leaves_the_counts_as_they_were() -> None:
    """A batch refused for a bad id applied its step's decay first (and counted the step): a
    caller that caught the error and trained on held counts decayed once more per refusal, by
    each channel's own factor — the channels' mix shifted, silently (audit).  Now the ids are
    checked before anything changes."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    channels = {"slow": (1.0, 0.5, 0.5), "fast": (1.0, 0.0, 0.9)}
    good = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([1, 4, 3, 2, 5, 0]),
                                               torch.tensor([1, 1, 1, 1, 1, 1]))
    bad = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([1, 40, 3]),
                                              torch.tensor([1, 1, 1]))
    ref, rp = RowPriority(_tables(), channels=channels), RowPriority(_tables(), channels=channels)
    labels = torch.tensor([1.0, 0.0])
    ref.update(good, labels)
    rp.update(good, labels)
    for _ in range(3):
        with pytest.raises(ValueError, match="outside table"):
            rp.update(bad, torch.tensor([1.0]))
    ref.update(good, labels)
    rp.update(good, labels)
    assert rp.step == ref.step == 2
    for c in channels:
        for t, p in ref.priorities(c).items():
            assert torch.equal(rp.priorities(c)[t], p), (c, t)


def test_attached_to_a_model_counts_training_forwards_only() -> None:
    tables = _tables()
    model = DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables),
                           dense_in_features=13, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]))
    batches = [SyntheticClickDataset(CFG, 16, 3).global_batch(g) for g in range(3)]
    rp = RowPriority(tables, gamma=1.0).attach(model)
    with rp:
        model.train()
        model(batches[0])
        model(batches[1])
        model.eval()
        model(batches[2])
    model.train()
    model(batches[2])  # detached
    ref = _naive(tables, batches[:2], 1.0, 0.2, 1.0)
    for name, p in rp.priorities().items():
        torch.testing.assert_close(p, ref[name])


def test_attach_refuses_models_it_cannot_read() -> None:
    """TorchRec's DLRM takes (dense, sparse) and no labels: attaching to it used to leave the
    priorities zero, and quantize_ then dropped every row without a word."""
    tables = _tables()
    dlrm = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
                dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    with pytest.raises(TypeError, match=r"DLRM is called with \(dense, sparse\) features and no labels.*"
                                        r"tracker\.update\(kjt, labels\)"):
        RowPriority(tables).attach(dlrm)

    class Wrapper(torch.nn.Module):  # not recognisable at attach time: refused at its first forward
        def __init__(self) -> None:
            super().__init__()
            self.inner = dlrm

        def forward(self, dense, sparse):
            return self.inner(dense, sparse)

    model = Wrapper()
    batch = SyntheticClickDataset(CFG, 16, 1).global_batch(0)
    rp = RowPriority(tables).attach(model)
    with pytest.raises(TypeError, match=r"Wrapper was called with \('Tensor', 'KeyedJaggedTensor'\), not a "
                                        r"TorchRec Batch"):
        model(batch.dense_features, batch.sparse_features)
    model.eval()
    model(batch.dense_features, batch.sparse_features)  # evaluation is not tracked: no error
    rp.detach()


def test_priorities_never_fed_are_refused_not_used_to_drop_every_row() -> None:
    from shark_torchrec.quant import RowwiseQuantConfig, quantize_

    tables = _tables()
    ebc = EmbeddingBagCollection(tables=tables)
    rp = RowPriority(tables)
    with pytest.raises(ValueError, match=r"row priorities are zero in every table.*no training batch"):
        quantize_(ebc, RowwiseQuantConfig(budget_fraction=0.3), priorities=rp.priorities())
    # one table never seen: a warning naming it, and its rows priced as unused
    batch = SyntheticClickDataset(CFG, 16, 1).global_batch(0)
    kjt = batch.sparse_features
    keep = [i for i, k in enumerate(kjt.keys()) if k != "cat_2"]
    rp.update(kjt.permute(keep), batch.labels)
    with pytest.warns(UserWarning, match=r"row priorities are zero in tables \['t2'\]"):
        quantize_(ebc, RowwiseQuantConfig(fractions={"int8": 0.5, "drop": 0.5}), priorities=rp.priorities())


def test_state_dict_round_trip() -> None:
    tables = _tables()
    batches = [SyntheticClickDataset(CFG, 16, 10).global_batch(g) for g in range(10)]
    full = RowPriority(tables, gamma=0.8)
    for b in batches:
        full.update(b.sparse_features, b.labels)
    first = RowPriority(tables, gamma=0.8)
    for b in batches[:4]:
        first.update(b.sparse_features, b.labels)
    resumed = RowPriority(tables, gamma=0.8)
    resumed.load_state_dict(first.state_dict())
    for b in batches[4:]:
        resumed.update(b.sparse_features, b.labels)
    for name, p in full.priorities().items():
        torch.testing.assert_close(resumed.priorities()[name], p, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="gamma=0.8"):
        RowPriority(tables, gamma=0.9).load_state_dict(first.state_dict())


@pytest.mark.slow
def test_sharded_over_two_processes_equals_one(tmp_path) -> None:
    """Each rank keeps half the rows; several channels, requests for any rows and a save read
    back by one process all give what one process computes from the global batches."""
    from conftest import ROOT, run_torchrun

    out, saved = tmp_path / "two.pt", tmp_path / "saved"
    run_torchrun(ROOT / "tests" / "scripts" / "row_priority_run.py", ["--out", out, "--save", saved], nproc=2)
    two = torch.load(out, weights_only=False)
    channels = {"pos": (1.0, 0.0, 0.9), "neg": (0.0, 1.0, 0.9), "plain": (1.0, 0.2, 1.0)}
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=41, feature_names=[f"cat_{i}"])
              for i in range(3)]
    cfg = SyntheticConfig.default(num_fields=3, num_informative=1, cardinality=41, multi_hot_fields=1,
                                  max_hot=4, seed=4)
    one = RowPriority(tables, channels=channels)
    batches = [SyntheticClickDataset(cfg, 16, 10).global_batch(g) for g in range(10)]
    for b in batches:
        one.update(b.sparse_features, b.labels)
    for c, (a, b_, g) in channels.items():
        ref = _naive(tables, batches, a, b_, g)
        for t in ref:
            torch.testing.assert_close(two["full"][c][t], ref[t], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(one.priorities(c)[t], ref[t], rtol=1e-5, atol=1e-12)
    mixed = {t: 1.0 * one.priorities("pos")[t] + 0.25 * one.priorities("neg")[t] for t in ref}
    for requests, answers, memory in two["gathered"]:
        assert memory == one.memory_bytes // 2 or abs(memory - one.memory_bytes / 2) <= 4 * 3 * 3
        for (t, r0, n), got in zip(requests, answers):
            torch.testing.assert_close(got, mixed[t][r0:r0 + n], rtol=1e-6, atol=1e-12)
    resumed = RowPriority(tables, channels=channels)
    resumed.load(str(saved))  # written by 2 ranks, read by 1
    assert resumed.step == two["step"] == 10
    for c in channels:
        for t, p in one.priorities(c).items():
            torch.testing.assert_close(resumed.priorities(c)[t], p, rtol=1e-6, atol=1e-12)


def test_rows_asked_outside_a_table_are_refused_not_clipped() -> None:
    """``rows`` answered a request reaching past a table with the part inside it (shorter than
    asked, silently): an error naming the table and rows, as for a table not tracked."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rp = RowPriority(_tables())
    kjt = KeyedJaggedTensor.from_lengths_sync(["cat_0", "cat_1", "cat_2"], torch.tensor([1, 39, 3]),
                                              torch.tensor([1, 1, 1]))
    rp.update(kjt, torch.tensor([1.0]))
    (inside,) = rp.rows([("t1", 30, 10)])
    assert inside.numel() == 10 and float(inside[9]) == rp.priorities()["t1"][39]
    for bad in (("t1", 35, 10), ("t1", -3, 5), ("t1", 41, 1)):
        with pytest.raises(ValueError, match=rf"rank 0 asked for rows {bad[1]}\.\.{bad[1] + bad[2]} of table 't1', "
                                             r"which has 40"):
            rp.rows([bad])
    with pytest.raises(KeyError, match=r"table 'tx', not tracked"):
        rp.rows([("tx", 0, 1)])
