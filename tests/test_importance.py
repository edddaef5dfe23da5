"""SHARK field importance on an unsharded model, against a per-sample reference; the
reference scorers; hooks, non-finite gradients and state round trips."""

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig
from shark_torchrec.importance import (
    PermutationImportance,
    RandomImportance,
    TaylorFieldImportance,
    dlrm_per_sample_loss,
    shuffle_feature,
)

CFG = SyntheticConfig.default(num_fields=4, num_informative=2, cardinality=50,
                              multi_hot_fields=1, max_hot=3, seed=1)


def _model(shared: bool = False) -> DLRMTrain:
    torch.manual_seed(0)
    feats = CFG.feature_names
    if shared:  # one table serves cat_0 and cat_1
        tables = [EmbeddingBagConfig(name="t01", embedding_dim=4, num_embeddings=50, feature_names=feats[:2])]
        tables += [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50, feature_names=[f])
                   for i, f in enumerate(feats) if i >= 2]
    else:
        tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50, feature_names=[f])
                  for i, f in enumerate(feats)]
    return DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables),
                          dense_in_features=13, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]))


def _batches(n: int, B: int = 16):
    return [SyntheticClickDataset(CFG, B, n).global_batch(g) for g in range(n)]


def _reference_scores(model: DLRMTrain, batches, baseline: str, seed: int = 0):
    """Per-sample losses, one autograd.grad each (batch size 1, as the ERASE benchmark does)."""
    dlrm = model.model
    feats = dlrm.sparse_arch.sparse_feature_names
    total = torch.zeros(len(feats), dtype=torch.float64)
    grad_sq = torch.zeros(len(feats), dtype=torch.float64)
    count = 0
    for step, b in enumerate(batches):
        kt = dlrm.sparse_arch.embedding_bag_collection(b.sparse_features)
        vals = kt.values()
        e = vals.detach().double()
        B = e.shape[0]
        if baseline == "zero":
            base = torch.zeros_like(e)
        elif baseline == "mean":
            base = e.mean(0, keepdim=True).expand_as(e)  # the batch's own mean
        else:
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
            base = e[perm]
        d = dlrm.dense_arch(b.dense_features)
        sp = torch.stack([kt.to_dict()[f] for f in feats], 1)
        logits = dlrm.over_arch(dlrm.inter_arch(d, sp)).squeeze(-1)
        for n in range(B):
            ln = F.binary_cross_entropy_with_logits(logits[n], b.labels[n])
            (g,) = torch.autograd.grad(ln, vals, retain_graph=True)
            for i in range(len(feats)):
                c = slice(4 * i, 4 * i + 4)
                grad_sq[i] += g[n, c].double().pow(2).sum()
                if bool((e[:, c] == e[0, c]).all()):
                    continue  # a field that does not vary in the batch contributes nothing
                total[i] += (g[n, c].double() * (base[n, c] - e[n, c])).sum().abs()
        count += B
    _reference_scores.grad_sq = {f: float(grad_sq[i] / count) for i, f in enumerate(feats)}
    return {f: float(total[i] / count) for i, f in enumerate(feats)}


@pytest.mark.parametrize("baseline", ["mean", "shuffle", "zero"])
def test_scores_equal_per_sample_reference(baseline: str) -> None:
    model = _model()
    batches = _batches(3)
    tracker = TaylorFieldImportance(model, baseline=baseline, seed=5)
    with tracker:
        for b in batches:
            loss, _ = model(b)
            loss.backward()  # no optimizer step: the reference sees the same weights
    ref = _reference_scores(model, batches, baseline, seed=5)
    got = tracker.scores()
    assert got.keys() == ref.keys()
    for f in ref:
        assert got[f] == pytest.approx(ref[f], rel=1e-5), (f, got, ref)
    assert tracker.samples_seen() == {f: 48 for f in ref}
    scales = tracker.gradient_scales()  # mean per-sample ‖g[n,f]‖²
    for f, v in _reference_scores.grad_sq.items():
        assert scales[f] == pytest.approx(v, rel=1e-5)
    assert tracker.skipped == {f: 0 for f in ref}


def _with_constant(b: Batch, feature: str, row: int, rare_every: int = 0) -> Batch:
    """``b`` with ``feature`` holding ``row`` in every sample (or, with ``rare_every``, a
    different row in every ``rare_every``-th sample: a near-constant field)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    jts = b.sparse_features.to_dict()
    B = b.labels.shape[0]
    values = torch.full((B,), row, dtype=torch.long)
    if rare_every:
        values[::rare_every] = (torch.arange(0, B, rare_every) * 7 + 3) % 50
    jts[feature] = JaggedTensor(values=values, lengths=torch.ones(B, dtype=torch.long))
    return Batch(dense_features=b.dense_features, labels=b.labels,
                 sparse_features=KeyedJaggedTensor.from_jt_dict(jts))


@pytest.mark.parametrize("baseline", ["mean", "shuffle", "zero"])
def test_constant_field_scores_zero_and_ranks_last_while_training(baseline: str) -> None:
    """A field with one value in every row carries no information: it must score exactly 0
    under every baseline, also while training moves its row (a running mean over past batches
    drifted away from the row and scored the drift; ``|<g, e>|`` is large for a row every
    sample's gradient reaches)."""
    model = _model()
    feats = CFG.feature_names
    batches = [_with_constant(b, feats[3], row=11) for b in _batches(30, B=32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = TaylorFieldImportance(model, baseline=baseline, seed=3)
    with tracker:
        for b in batches:
            opt.zero_grad()
            model(b)[0].backward()
            opt.step()
    scores = tracker.scores()
    assert scores[feats[3]] == 0.0, scores
    assert all(scores[f] > 0 for f in feats[:3]), scores
    assert min(scores, key=scores.get) == feats[3]


def test_near_constant_field_scores_below_informative_fields() -> None:
    """A field that differs in one sample of 16 (noise otherwise) scores below the planted
    informative fields with the default baseline."""
    model = _model()
    feats = CFG.feature_names
    batches = [_with_constant(b, feats[3], row=11, rare_every=16) for b in _batches(30, B=32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = TaylorFieldImportance(model, baseline="mean")
    with tracker:
        for b in batches:
            opt.zero_grad()
            model(b)[0].backward()
            opt.step()
    scores = tracker.scores()
    assert 0 < scores[feats[3]] < min(scores[f] for f in CFG.informative), scores


def test_zero_baseline_does_not_depend_on_batch_size() -> None:
    model = _model()
    big = _batches(1, B=32)[0]
    halves = []
    for s in (slice(0, 16), slice(16, 32)):
        keep = torch.zeros(32, dtype=torch.bool)
        keep[s] = True
        halves.append(Batch(dense_features=big.dense_features[s], labels=big.labels[s],
                            sparse_features=_select_samples(big.sparse_features, keep)))
    scores = []
    for batches in ([big], halves):
        t = TaylorFieldImportance(model, baseline="zero")
        with t:
            for b in batches:
                model(b)[0].backward()
        scores.append(t.scores())
    for f in scores[0]:
        assert scores[1][f] == pytest.approx(scores[0][f], rel=1e-6)


def test_shared_table_scores_each_feature_and_table_takes_the_max() -> None:
    model = _model(shared=True)
    t = TaylorFieldImportance(model, baseline="zero")
    with t:
        for b in _batches(2):
            model(b)[0].backward()
    s = t.scores()
    assert set(s) == set(CFG.feature_names) and s["cat_0"] != s["cat_1"]
    tables = model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert t.table_scores(tables)["t01"] == max(s["cat_0"], s["cat_1"])


def test_non_finite_gradients_are_skipped_and_counted() -> None:
    model = _model()
    b = _batches(1)[0]
    labels = b.labels.clone()
    labels[3] = float("nan")  # sample 3's loss (and so its gradient) is NaN
    bad = Batch(dense_features=b.dense_features, sparse_features=b.sparse_features, labels=labels)
    t = TaylorFieldImportance(model, baseline="zero")
    with t:
        model(bad)[0].backward()
    ref = TaylorFieldImportance(model, baseline="zero")
    keep = torch.arange(16) != 3
    clean = Batch(dense_features=b.dense_features[keep], labels=b.labels[keep],
                  sparse_features=_select_samples(b.sparse_features, keep))
    with ref:
        model(clean)[0].backward()
    assert t.skipped == {f: 1 for f in CFG.feature_names}
    assert t.samples_seen() == {f: 15 for f in CFG.feature_names}
    got, want = t.scores(), ref.scores()
    for f in want:  # per-sample gradients: the NaN sample changes nothing else
        assert got[f] == pytest.approx(want[f], rel=1e-5)


def _select_samples(kjt, keep):
    """The samples of ``kjt`` where the boolean mask ``keep`` is set."""
    idx = keep.nonzero().flatten().tolist()
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    d = kjt.to_dict()
    vals, lens = [], []
    for k in kjt.keys():
        jt = d[k]
        o = jt.offsets()
        vals += [jt.values()[o[i]:o[i + 1]] for i in idx]
        lens.append(jt.lengths()[keep])
    return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(vals), torch.cat(lens))


def test_hooks_are_removed_even_on_error_and_detached_costs_nothing() -> None:
    model = _model()
    ebc = model.model.sparse_arch.embedding_bag_collection
    t = TaylorFieldImportance(model, baseline="mean")
    with pytest.raises(RuntimeError, match="boom"):
        with t:
            assert len(ebc._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(ebc._forward_hooks) == 0 and not t.attached
    model(_batches(1)[0])[0].backward()
    assert t.samples_seen() == {f: 0 for f in CFG.feature_names}
    # A forward taken while attached, backpropagated after detaching, is not counted.
    t.attach()
    loss = model(_batches(1)[0])[0]
    t.detach()
    loss.backward()
    assert t.samples_seen() == {f: 0 for f in CFG.feature_names}


@pytest.mark.parametrize("baseline", ["mean", "shuffle"])
def test_state_dict_round_trip_resumes_scoring(baseline: str) -> None:
    model = _model()
    batches = _batches(4)
    full = TaylorFieldImportance(model, baseline=baseline, seed=2)
    with full:
        for b in batches:
            model(b)[0].backward()
    first = TaylorFieldImportance(model, baseline=baseline, seed=2)
    with first:
        for b in batches[:2]:
            model(b)[0].backward()
    state = first.state_dict()
    resumed = TaylorFieldImportance(model, baseline=baseline, seed=2)
    resumed.load_state_dict(state)
    with resumed:
        for b in batches[2:]:
            model(b)[0].backward()
    for f, v in full.scores().items():
        assert resumed.scores()[f] == pytest.approx(v, rel=1e-9)
    other = TaylorFieldImportance(model, baseline="zero")
    with pytest.raises(ValueError, match="baseline"):
        other.load_state_dict(state)


def test_shuffle_feature_moves_only_that_feature() -> None:
    b = _batches(1)[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    s = shuffle_feature(b.sparse_features, "cat_3", perm)
    before, after = b.sparse_features.to_dict(), s.to_dict()
    for k in CFG.feature_names:
        if k == "cat_3":
            dense_b = before[k].to_padded_dense(3, padding_value=-1)
            assert torch.equal(after[k].to_padded_dense(3, padding_value=-1), dense_b[perm])
        else:
            assert torch.equal(after[k].values(), before[k].values())
            assert torch.equal(after[k].lengths(), before[k].lengths())


def test_permutation_importance_against_a_direct_computation() -> None:
    model = _model()
    model.eval()
    batches = _batches(2)
    pi = PermutationImportance(dlrm_per_sample_loss(model), CFG.feature_names, seed=3).evaluate(batches)
    got = pi.scores()
    # Direct: the same permutations (generator per batch, fields in order), loss differences.
    want = {f: 0.0 for f in CFG.feature_names}
    with torch.no_grad():
        for g, b in enumerate(batches):
            gen = torch.Generator().manual_seed(3 * 1_000_003 + g)
            base = dlrm_per_sample_loss(model)(b)
            for f in CFG.feature_names:
                perm = torch.randperm(16, generator=gen)
                shuffled = Batch(b.dense_features, shuffle_feature(b.sparse_features, f, perm), b.labels)
                want[f] += float((dlrm_per_sample_loss(model)(shuffled) - base).sum()) / 32
    for f in want:
        assert got[f] == pytest.approx(want[f], rel=1e-9, abs=1e-12)
    r = RandomImportance(CFG.feature_names, seed=0)
    assert r.scores() == RandomImportance(CFG.feature_names, seed=0).scores()
    assert len(set(r.ranking())) == 4


def test_batch_mean_is_summed_in_float64() -> None:
    """The batch-mean baseline's column sums are float64 on every path: a float32 running sum
    over 2^20 rows of 0.3 was off by 154 (its mean by 1.5e-4), more than the gap between a
    near-constant field's rows and their mean, whose score it then got wrong by up to 3x."""
    from shark_torchrec.importance.taylor import _column_stats

    e = torch.full((1 << 20, 4), 0.3)
    e[::1000, 1] = 0.5  # a near-constant column
    sums, lo, hi = _column_stats(e)
    want = e.double().sum(0)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-9)
    assert torch.equal(lo, e.amin(0)) and torch.equal(hi, e.amax(0))


def test_table_scores_refuse_a_feature_never_scored_whatever_the_order() -> None:
    """``max`` of a NaN (a feature no batch reached) and a number gave the number or NaN by
    their order: the table's score depended on its features' order.  Now an error naming it."""
    from shark_torchrec.importance import table_scores

    for order in (["seen", "unseen"], ["unseen", "seen"]):
        t = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=order)
        with pytest.raises(ValueError, match=r"table 't': no score for features \['unseen'\] \(no data seen\)"):
            table_scores({"seen": 0.5, "unseen": float("nan")}, [t])


def test_collection_paths_are_the_same_sharded_or_not() -> None:
    """DMP's ``_dmp_wrapped_module.`` prefix is stripped as DDP's ``module.`` is: a state saved
    unsharded loads into the sharded model and back (its paths differed), and a state saved
    with the prefix (before) loads."""
    from shark_torchrec.importance.base import _strip

    assert _strip("_dmp_wrapped_module.module.model.sparse_arch.ebc") == "model.sparse_arch.ebc"
    assert _strip("module._dmp_wrapped_module.ebc") == "ebc"
    model = _model()
    t = TaylorFieldImportance(model, baseline="mean")
    with t:
        for b in _batches(2):
            model(b)[0].backward()
    state = t.state_dict()
    state["collections"] = {"_dmp_wrapped_module." + k: v for k, v in state["collections"].items()}
    again = TaylorFieldImportance(model, baseline="mean")
    again.load_state_dict(state)
    assert again.scores() == t.scores()


def test_a_global_batch_of_one_sample_is_logged(caplog) -> None:
    """One sample varies in nothing: such steps score nothing (the gate), and the log says so."""
    import logging

    model = _model()
    t = TaylorFieldImportance(model, baseline="mean")
    with caplog.at_level(logging.WARNING, logger="shark_torchrec.importance.taylor"), t:
        model(_batches(1, B=1)[0])[0].backward()
        t.scores()
    assert "a global batch of 1 sample(s): no field varies within it" in caplog.text


def test_a_feature_several_tables_read_is_scored_per_table() -> None:
    """TorchRec names a feature read by two tables ``<feature>@<table>`` in the collection's
    output: the tracker raised a KeyError at the first step.  Now each is scored apart, equal
    to a per-sample reference (zero baseline: mean over samples of |<g_n, e_n>|), and the
    table scores take TorchRec's names."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"]),
              EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f1", "f2"])]
    ebc = EmbeddingBagCollection(tables=tables)
    head = torch.nn.Linear(12, 1)
    B = 6
    kjt = KeyedJaggedTensor.from_lengths_sync(["f1", "f2"], torch.randint(10, (12,)), torch.ones(12, dtype=torch.long))
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    t = TaylorFieldImportance(ebc, baseline="zero", background=False)
    with t:
        kt = ebc(kjt)
        F.binary_cross_entropy_with_logits(head(kt.values()).squeeze(-1), y).backward()
    assert kt.keys() == ["f1@t1", "f1@t2", "f2"]
    vals = ebc(kjt).values()
    logits = head(vals).squeeze(-1)
    ref = torch.zeros(3, dtype=torch.float64)
    for n in range(B):
        (g,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits[n], y[n]), vals, retain_graph=True)
        for i in range(3):
            c = slice(4 * i, 4 * i + 4)
            ref[i] += float((g[n, c].double() * vals[n, c].double()).sum().abs()) / B
    got = t.scores()
    assert list(got) == ["f1@t1", "f1@t2", "f2"]
    for i, name in enumerate(got):
        assert got[name] == pytest.approx(float(ref[i]), rel=1e-5)
    assert t.table_scores(tables) == {"t1": got["f1@t1"], "t2": max(got["f1@t2"], got["f2"])}


def test_a_failed_background_step_is_never_read_as_whole_sums(monkeypatch) -> None:
    """A tracker step that failed on the worker thread was raised once, at the next drain, then
    forgotten: a caller that caught it read sums missing every step queued between the failure
    and that drain (4 of 12 steps counted, silently; audit).  The error now stays: every later
    read and step raises until ``reset()``, after which the sums are whole again (the first
    raise comes at the next step's hook or read, whichever is first)."""
    import torch.nn.functional as F
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    import shark_torchrec.importance.taylor as T

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"])
              for i in range(2)]
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables)
    w = torch.randn(16)
    tracker = TaylorFieldImportance(ebc, baseline="mean", background=True).attach()
    original, calls = T.TaylorFieldImportance._accumulate, [0]

    def failing_once(self, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure")
        return original(self, *args)

    monkeypatch.setattr(T.TaylorFieldImportance, "_accumulate", failing_once)

    def step(s: int) -> None:
        g = torch.Generator().manual_seed(s)
        lengths = torch.randint(1, 3, (2 * 16,), generator=g)
        kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.randint(0, 50, (int(lengths.sum()),), generator=g),
                                lengths=lengths)
        F.binary_cross_entropy_with_logits(ebc(kjt).values() @ w, torch.rand(16, generator=g)).backward()

    for s in range(2):
        step(s)
    tracker._background.drain()  # (the first two steps' work done)
    step(2)  # its work fails on the worker thread
    with pytest.raises(RuntimeError, match="injected failure"):
        tracker.scores()  # (or the next step's hook, whichever comes first)
    for read in (tracker.scores, tracker.gradient_scales, tracker.state_dict):
        with pytest.raises(RuntimeError, match="its sums are incomplete"):
            read()
    with pytest.raises(RuntimeError, match="its sums are incomplete"):
        step(4)  # (the hook refuses to add to incomplete sums)
    tracker.reset()
    for s in range(5, 8):
        step(s)
    assert all(n == 3 * 16 for n in tracker.samples_seen().values())


@pytest.mark.parametrize("baseline", ["mean", "zero", "shuffle"])
def test_the_worker_thread_scores_exactly_as_inline(baseline: str, monkeypatch) -> None:
    """With the worker thread on (CPU), ``mean`` and ``zero`` leave a step's whole score to it —
    the batch statistics' pass over the pooled embeddings included, most of what the hooks cost
    the training thread — and ``shuffle`` its sums: the same sums, bit for bit, as inline; and
    the training thread makes no pass over the batch then."""
    import threading

    import shark_torchrec.importance.taylor as T

    batches = _batches(4)
    results = {}
    for background in (False, True):
        model = _model()
        tracker = TaylorFieldImportance(model, baseline=baseline, seed=3, background=background)
        threads = []
        original = T._column_stats

        def spy(e):
            threads.append(threading.current_thread() is threading.main_thread())
            return original(e)

        monkeypatch.setattr(T, "_column_stats", spy)
        with tracker:
            for b in batches:
                loss, _ = model(b)
                loss.backward()
        results[background] = (tracker.scores(), tracker.gradient_scales(), tracker.samples_seen())
        monkeypatch.setattr(T, "_column_stats", original)
        assert len(threads) == len(batches)
        on_main = background is False or baseline == "shuffle"  # (shuffle's permutation needs them in the forward)
        assert all(t == on_main for t in threads), (background, threads)
    assert results[True] == results[False]  # (dicts of floats: exact equality)


def test_the_worker_thread_holds_at_most_a_few_steps_of_work() -> None:
    """Each step handed to the worker holds its tensors (tens of MB on a DLRM): a worker slower
    than the steps piled them up without bound.  A submit beyond ``MAX_PENDING`` waiting ones now
    waits for the worker; everything submitted still runs, in order."""
    import threading

    from shark_torchrec.importance.background import Background

    bg, release, done = Background(), threading.Event(), []
    bg.submit(release.wait)  # (the worker busy until released)
    submitted = []

    def producer() -> None:
        for i in range(Background.MAX_PENDING + 3):
            bg.submit(lambda i=i: done.append(i))
            submitted.append(i)

    t = threading.Thread(target=producer)
    t.start()
    t.join(timeout=2.0)
    assert t.is_alive() and len(submitted) == Background.MAX_PENDING  # (the next submit waits)
    release.set()
    t.join(timeout=10.0)
    assert not t.is_alive()
    bg.drain()
    assert done == list(range(Background.MAX_PENDING + 3))
