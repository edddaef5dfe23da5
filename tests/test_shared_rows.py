"""The SHARED tier: rows read as one of their table's FP16 centroids (a priority-weighted
k-means), storing only their id-map entry."""

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant import (
    TIER_ORDER,
    RowwiseMixedEmbeddingBagCollection,
    RowwiseQuantConfig,
    Tier,
    assign_by_budget,
    assign_by_fractions,
    dequantize_rows,
    quantize_,
)
from shark_torchrec.quant.layout import MixedLayout
from shark_torchrec.quant.tiers import BudgetError
from shark_torchrec.quant.shared_rows import K_CANDIDATES, cluster_rows

SHARED = TIER_ORDER.index(Tier.SHARED)


def test_one_centroid_is_the_priority_weighted_mean_row() -> None:
    torch.manual_seed(0)
    w = torch.randn(300, 12)
    p = torch.rand(300, dtype=torch.float64)
    s = cluster_rows(w, p, 1)
    mean = (w.double() * p.unsqueeze(1)).sum(0) / p.sum()
    assert s.k == 1 and torch.equal(s.centroids[0], mean.float().half().float())
    assert torch.equal(s.index.long(), torch.zeros(300, dtype=torch.long))
    torch.testing.assert_close(s.error.double(), ((w.double() - s.centroids[0].double()) ** 2).sum(1))
    # no priorities (or all zero): the plain mean
    assert torch.equal(cluster_rows(w, torch.zeros(300), 1).centroids, cluster_rows(w, None, 1).centroids)
    torch.testing.assert_close(cluster_rows(w, None, 1).centroids[0], w.mean(0).half().float())


def test_every_row_gets_its_nearest_centroid_as_stored() -> None:
    torch.manual_seed(1)
    centers = torch.randn(8, 16) * 4
    w = centers[torch.randint(8, (2000,))] + 0.1 * torch.randn(2000, 16)
    s = cluster_rows(w, torch.rand(2000), 8, seed=3)
    assert s.k == 8 and s.centroids.dtype == torch.float32
    assert torch.equal(s.centroids, s.centroids.half().float())  # what FP16 storage reads back
    d = torch.cdist(w.double(), s.centroids.double()) ** 2
    assert torch.equal(d.argmin(1), s.index.long())
    torch.testing.assert_close(s.error.double(), d.min(1).values)
    # well-separated clusters are found: nearly every row within its noise of a centroid
    assert float((s.error < 16 * 0.1 ** 2 * 4).double().mean()) > 0.95
    assert float(cluster_rows(w, None, 1).error.mean()) > 10 * float(s.error.mean())
    again = cluster_rows(w, torch.rand(2000, generator=torch.Generator().manual_seed(0)), 8, seed=3)
    assert again.k == 8  # (priorities change the centroids, not the contract)


def test_a_non_finite_row_is_named() -> None:
    w = torch.randn(100, 4)
    w[42, 1] = float("nan")
    for k in (1, 4):
        with pytest.raises(ValueError, match="row 42 of the weights is not finite"):
            cluster_rows(w, None, k)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_the_assignment_in_chunks_is_the_nearest_centroid_and_its_distance(monkeypatch, use_kernel: bool) -> None:
    """Every row's centroid is its nearest (the first of equals), its error the float64 distance,
    in chunks, by the ``nearest_centroid`` kernel and by the plain torch path alike."""
    from shark_torchrec.quant import cpu_kernel, shared_rows

    if use_kernel and not cpu_kernel.cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    monkeypatch.setattr(cpu_kernel, "cpu_kernel_available", lambda: use_kernel)
    monkeypatch.setattr(shared_rows, "ASSIGN_ROWS", 100)
    g = torch.Generator().manual_seed(5)
    c = (torch.randn(37, 24, generator=g) * 3).half().float()  # (37: not a multiple of the vector width)
    c[30] = c[4]  # a tie: the first of the two is nearest
    w = c[torch.randint(37, (1037,), generator=g)] + 0.2 * torch.randn(1037, 24, generator=g)
    index, error = shared_rows._assign(w, c)
    d = ((w.double().unsqueeze(1) - c.double().unsqueeze(0)) ** 2).sum(2)
    assert torch.equal(index.long(), d.argmin(1)) and not bool((index == 30).any())
    torch.testing.assert_close(error, d.min(1).values.float(), rtol=1e-6, atol=0)
    w[911, 5] = float("inf")
    with pytest.raises(ValueError, match="row 911 of the weights is not finite"):
        shared_rows._assign(w, c)


def _reference(weights, tiers, shared):
    """Each row as the mixed collection stores it: its tier's dequantized row, its centroid
    (SHARED) or zeros (DROP)."""
    out = torch.zeros_like(weights)
    for i, tier in enumerate(TIER_ORDER):
        rows = tiers == i
        if not bool(rows.any()):
            continue
        out[rows] = shared.centroids[shared.index[rows].long()] if tier is Tier.SHARED else \
            dequantize_rows(weights[rows], tier)
    return out


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_shared_rows_read_their_centroids_in_both_lookups(use_kernel: bool, weighted: bool) -> None:
    """Exact against F.embedding_bag on the rows as stored, SUM and MEAN (a DROP id still
    counts in a MEAN bag), through the fused CPU kernel and FBGEMM's bucketize + TBE path, and
    after a save/load round trip."""
    torch.manual_seed(2)
    configs = [EmbeddingBagConfig(name="a", num_embeddings=400, embedding_dim=16, feature_names=["fa"]),
               EmbeddingBagConfig(name="b", num_embeddings=90, embedding_dim=8, feature_names=["fb"],
                                  pooling=PoolingType.MEAN)]
    weights = {c.name: torch.randn(c.num_embeddings, c.embedding_dim) for c in configs}
    tiers = {c.name: torch.randint(0, len(TIER_ORDER), (c.num_embeddings,), dtype=torch.int8) for c in configs}
    tiers["a"][:40] = SHARED
    shared = {"a": cluster_rows(weights["a"], None, 16), "b": cluster_rows(weights["b"], None, 1)}
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, is_weighted=weighted,
                                                        row_alignment=1, shared=shared)
    m.use_cpu_kernel = use_kernel
    B = 32
    lengths = torch.randint(0, 6, (2 * B,))
    values = torch.cat([torch.randint(400, (int(lengths[:B].sum()),)), torch.randint(90, (int(lengths[B:].sum()),))])
    w = torch.rand(values.numel()) if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(["fa", "fb"], values, lengths, weights=w)
    out = m(kjt)
    loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(m.state_dict())
    loaded.use_cpu_kernel = use_kernel
    again = loaded(kjt)
    for c, f in zip(configs, ["fa", "fb"]):
        j = kjt[f]
        table = _reference(weights[c.name], tiers[c.name], shared[c.name])
        mode = "sum" if c.pooling == PoolingType.SUM else "mean"
        want = F.embedding_bag(j.values(), table, j.offsets()[:-1], mode=mode,
                               per_sample_weights=j.weights() if weighted and mode == "sum" else None,
                               include_last_offset=False)
        if weighted and mode == "mean":  # weighted MEAN: the weighted sum over the bag's length
            s = F.embedding_bag(j.values(), table, j.offsets()[:-1], mode="sum", per_sample_weights=j.weights())
            want = s / j.lengths().clamp(min=1).unsqueeze(1)
        torch.testing.assert_close(out[f], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(again[f], out[f])
    # bytes: the centroids sit in the FP16 sub-table, the shared rows store nothing
    assert m.layout.shared == {"a": [int((tiers["a"] == SHARED).sum()), 16],
                               "b": [int((tiers["b"] == SHARED).sum()), 1]}
    fp16 = m.layout.tiers.index("fp16")
    assert m.layout.rows["a"][fp16] == int((tiers["a"] == TIER_ORDER.index(Tier.FP16)).sum()) + 16


def test_a_layout_whose_rows_do_not_add_up_is_refused() -> None:
    t = {"name": "t", "rows": 10, "dim": 4, "features": ["f"], "pooling": "SUM"}
    MixedLayout(tables=[t], tiers=["fp16", "int8"], rows={"t": [3, 4]}, shared={"t": [5, 2]}).check()
    with pytest.raises(ValueError, match=r"table 't': rows per tier \[3, 5\] do not add up to 10 rows "
                                         r"\(5 of them shared, 2 centroids\)"):
        MixedLayout(tables=[t], tiers=["fp16", "int8"], rows={"t": [3, 5]}, shared={"t": [5, 2]}).check()
    with pytest.raises(ValueError, match="without an fp16 tier"):
        MixedLayout(tables=[t], tiers=["int8"], rows={"t": [7]}, shared={"t": [5, 2]}).check()


def test_shared_rows_without_centroids_are_refused() -> None:
    c = EmbeddingBagConfig(name="t", num_embeddings=20, embedding_dim=4, feature_names=["f"])
    tiers = torch.full((20,), SHARED, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"table 't': 20 SHARED rows need its centroids"):
        RowwiseMixedEmbeddingBagCollection.from_weights([c], {"t": torch.randn(20, 4)}, {"t": tiers})
    with pytest.raises(ValueError, match="SHARED tier needs centroids per table; use shark_torchrec.quant.assign_tiers"):
        assign_by_fractions({"t": torch.rand(20)}, {"t": 4}, {"shared": 1.0})
    with pytest.raises(ValueError, match="SHARED tier needs centroids per table"):
        assign_by_budget({"t": torch.rand(20)}, {"t": torch.randn(20, 4)}, 100, tiers=("int8", "shared"))


def _clustered_collection(clusters: int) -> EmbeddingBagCollection:
    torch.manual_seed(4)
    configs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=16, feature_names=[f"f{i}"])
               for i, n in enumerate([4000, 600])]
    ebc = EmbeddingBagCollection(tables=configs)
    with torch.no_grad():
        for c in configs:
            centers = torch.randn(clusters, 16)
            ebc.embedding_bags[c.name].weight.copy_(centers[torch.randint(clusters, (c.num_embeddings,))]
                                                    + 0.05 * torch.randn(c.num_embeddings, 16))
    return ebc


def _weighted_error(ebc, m, prio) -> float:
    a = m.assignment
    total = 0.0
    for n in a.tiers:
        w = ebc.embedding_bags[n].weight.detach()
        stored = _reference(w, a.tiers[n], a.shared.get(n))
        total += float((prio[n].double() * ((stored - w).double() ** 2).sum(1)).sum())
    return total


def test_the_budget_chooses_centroids_per_table_and_holds_its_bytes(monkeypatch, caplog) -> None:
    """16 clusters per table: the budget's choice of K per table does as well as the best
    single K forced on every table, the collection holds no more than the budget, reads what
    the assignment says, and its priority-weighted error is far below dropping the rows.  The
    log says what the k-means and the budget did."""
    import logging

    import shark_torchrec.sharded.assign as assign

    caplog.set_level(logging.INFO, logger=assign.__name__)

    ebc = _clustered_collection(16)
    prio = {c.name: torch.rand(c.num_embeddings) ** 3 for c in ebc.embedding_bag_configs()}
    fp32 = sum(c.num_embeddings * 64 for c in ebc.embedding_bag_configs())

    def compress(last: str):
        config = RowwiseQuantConfig(budget_fraction=0.1, tiers=("fp16", "int8", "int4", "int2", last), row_alignment=1)
        m = quantize_(ebc, config, priorities=prio)
        assert m.memory_report()["total_bytes"] <= int(0.1 * fp32)
        return m

    m = compress("shared")
    a = m.assignment
    chosen = {n: s.k for n, s in a.shared.items()}
    assert set(chosen) == {"t0", "t1"} and min(chosen.values()) >= 16  # not the mean row
    assert a.details["centroids t0"] == chosen["t0"] and set(chosen.values()) <= set(K_CANDIDATES)
    said = caplog.text
    assert "k-means of 9 candidate centroid sets (K in [1, 4, 16, 64, 256])" in said, said
    assert f"centroids per table {{'t0': {chosen['t0']}, 't1': {chosen['t1']}}}" in said, said
    assert all(int((t == SHARED).sum()) > 0.5 * t.numel() for t in a.tiers.values())
    kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.tensor([5, 17, 3]), torch.tensor([2, 1]))
    table = _reference(ebc.embedding_bags["t0"].weight.detach(), a.tiers["t0"], a.shared["t0"])
    torch.testing.assert_close(m(kjt)["f0"][0], table[5] + table[17])
    error = _weighted_error(ebc, m, prio)
    forced = {}
    for k in K_CANDIDATES:
        monkeypatch.setattr(assign, "K_CANDIDATES", (k,))
        try:
            forced[k] = _weighted_error(ebc, compress("shared"), prio)
        except BudgetError:  # that many centroids in every table do not fit the budget
            pass
    monkeypatch.undo()
    assert error <= 1.01 * min(forced.values()), (error, forced)
    assert error < 0.2 * _weighted_error(ebc, compress("drop"), prio)


def test_row_tiers_saved_before_the_shared_tier_still_read_right(tmp_path) -> None:
    """A run's quantize/row_tiers written with the six-tier order (5 was DROP) reads as DROP
    now that SHARED sits before it; files written now carry their order."""
    from shark_torchrec.quantize_stage import _ORDER_KEY, read_row_tiers

    torch.save({"t@0": torch.tensor([0, 1, 5], dtype=torch.int8)}, tmp_path / "rank-00000.pt")
    assert read_row_tiers(str(tmp_path))["t"].tolist() == [0, 1, TIER_ORDER.index(Tier.DROP)]
    torch.save({_ORDER_KEY: [t.value for t in TIER_ORDER], "t@0": torch.tensor([SHARED, 6], dtype=torch.int8)},
               tmp_path / "rank-00000.pt")
    assert read_row_tiers(str(tmp_path))["t"].tolist() == [SHARED, TIER_ORDER.index(Tier.DROP)]


def test_kmeans_pp_seeds_are_those_of_the_direct_distances() -> None:
    """The seeding's distances by matrix-vector products draw exactly the seeds that the plain
    squared differences draw (the same random stream, the same probabilities to rounding)."""
    import numpy as np

    from shark_torchrec.quant.shared_rows import _kmeans_pp

    def direct(x, weights, k, g):  # the textbook loop, in float64
        pts = torch.from_numpy(x).double()
        w = torch.ones(len(pts), dtype=torch.float64) if weights is None else torch.from_numpy(weights).double()
        seeds = [int(torch.multinomial(w / w.sum(), 1, generator=g))]
        nearest = ((pts - pts[seeds[0]]) ** 2).sum(1)
        for _ in range(1, k):
            mass = w * nearest
            seeds.append(int(torch.multinomial(mass / mass.sum(), 1, generator=g)))
            nearest = torch.minimum(nearest, ((pts - pts[seeds[-1]]) ** 2).sum(1))
        return x[seeds]

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 16)) * rng.random((3000, 1)) + 5.0).astype(np.float32)  # offset: cancellation
    for weights in (None, rng.random(3000).astype(np.float32)):
        got = _kmeans_pp(x, weights, 64, torch.Generator().manual_seed(1))
        want = direct(x, weights, 64, torch.Generator().manual_seed(1))
        assert np.array_equal(got, want)


def test_centroids_fitted_to_some_rows_are_theirs_alone() -> None:
    """``among``: the centroids come from the marked rows only (their priority-weighted mean
    for K = 1, equal weights where theirs are all zero); every row is still assigned."""
    torch.manual_seed(4)
    w = torch.randn(400, 8)
    w[:200] += 5.0  # two far-apart halves
    p = torch.rand(400, dtype=torch.float64)
    among = torch.zeros(400, dtype=torch.bool)
    among[250:] = True
    s = cluster_rows(w, p, 1, among=among)
    mean = (w[250:].double() * p[250:].unsqueeze(1)).sum(0) / p[250:].sum()
    assert torch.equal(s.centroids[0], mean.float().half().float())
    assert s.error.numel() == 400
    torch.testing.assert_close(s.error.double(), ((w.double() - s.centroids[0].double()) ** 2).sum(1))
    zero = cluster_rows(w, torch.zeros(400), 1, among=among)
    torch.testing.assert_close(zero.centroids[0], w[250:].mean(0).half().float())
    # K > 1: every centroid lies among the marked half (none in the other, 5 away per column)
    s8 = cluster_rows(w, p, 8, seed=2, among=among)
    assert s8.k == 8 and float(s8.centroids.mean(1).max()) < 2.5
    assert cluster_rows(w, p, 8, among=torch.arange(400) < 3).k == 3  # at most as many as marked rows
    with pytest.raises(ValueError, match="among must mark"):
        cluster_rows(w, p, 1, among=torch.zeros(400, dtype=torch.bool))


def test_the_budget_fits_the_centroids_to_the_rows_that_share(monkeypatch) -> None:
    """Important rows in one region, unimportant ones in another: the budget shares the
    unimportant ones, and their centroid (K = 1 here) is refitted to them — their weighted
    mean, not the mean of all rows, which the important rows drag away; the priority-weighted
    error is lower than without the refit (RECLUSTER_ROUNDS = 0)."""
    import shark_torchrec.sharded.assign as assign

    torch.manual_seed(5)
    rows = 256
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=rows,
                                                            feature_names=["f0"])])
    w = torch.randn(rows, 16)
    w[: rows // 4] += 3.0  # the important quarter, away from the rest
    with torch.no_grad():
        ebc.embedding_bags["t0"].weight.copy_(w)
    prio = {"t0": torch.cat([torch.full((rows // 4,), 100.0), torch.rand(rows - rows // 4) * 0.1 + 0.01])}
    monkeypatch.setattr(assign, "K_CANDIDATES", (1,))
    config = RowwiseQuantConfig(budget_fraction=0.12, tiers=("fp16", "int8", "int4", "int2", "shared"),
                                row_alignment=1)
    m = quantize_(ebc, config, priorities=prio)
    a = m.assignment
    shared = a.tiers["t0"] == SHARED
    assert int(shared.sum()) > rows // 4 and not bool(shared[: rows // 4].any())
    p = prio["t0"].double()[shared]
    mean = (w[shared].double() * p.unsqueeze(1)).sum(0) / p.sum()
    assert torch.equal(a.shared["t0"].centroids[0], mean.float().half().float())
    refitted = _weighted_error(ebc, m, prio)
    monkeypatch.setattr(assign, "RECLUSTER_ROUNDS", 0)
    unfitted = quantize_(ebc, config, priorities=prio)
    assert not torch.equal(unfitted.assignment.shared["t0"].centroids, a.shared["t0"].centroids)
    assert refitted < _weighted_error(ebc, unfitted, prio)


def test_seeds_are_drawn_from_at_most_seed_rows(monkeypatch) -> None:
    """k-means++ draws its seeds from at most ``SEED_ROWS`` rows of the training sample (each
    seed is a pass over them), a random part of a larger sample, and still seeds every one of
    well-separated clusters; a sample within the cap is seeded whole, as before."""
    import shark_torchrec.quant.shared_rows as S

    seen = []
    real = S._kmeans_pp

    def spy(x, weights, k, g):
        seen.append(x.shape[0])
        return real(x, weights, k, g)

    monkeypatch.setattr(S, "_kmeans_pp", spy)
    monkeypatch.setattr(S, "SEED_ROWS", 256)
    torch.manual_seed(0)
    centers = torch.randn(16, 8) * 20
    w = centers.repeat_interleave(100, 0) + torch.randn(1600, 8) * 0.1
    s = S.cluster_rows(w, torch.rand(1600), 16)  # a sample of min(1600, 64 * 16) = 1024 rows
    assert seen == [256]
    # every row read as its own cluster's centroid: the error is the within-cluster spread
    assert float(s.error.max()) < 1.0
    assert sorted(set(s.index.tolist())) == list(range(16))
    seen.clear()
    S.cluster_rows(w[:200], None, 2)  # a sample of 128 rows: seeded whole
    assert seen == [128]


def test_candidates_clustered_concurrently_are_those_clustered_one_after_another() -> None:
    """With more than one torch thread the candidates' k-means run as concurrent tasks: the
    tiers, centroids and assignments are those of one thread, the thread count is restored,
    and a non-finite row is still named."""
    ebc = _clustered_collection(16)
    prio = {c.name: torch.rand(c.num_embeddings, generator=torch.Generator().manual_seed(1)) ** 3
            for c in ebc.embedding_bag_configs()}
    config = RowwiseQuantConfig(budget_fraction=0.1, tiers=("fp16", "int8", "int4", "int2", "shared"), row_alignment=1)
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 3):
            torch.set_num_threads(threads)
            a = quantize_(ebc, config, priorities=prio).assignment
            assert torch.get_num_threads() == threads
            results[threads] = a
        one, many = results[1], results[3]
        assert set(one.shared) == set(many.shared) == {"t0", "t1"}
        for t in ("t0", "t1"):
            assert torch.equal(one.tiers[t], many.tiers[t])
            for field in ("centroids", "index", "error"):
                assert torch.equal(getattr(one.shared[t], field), getattr(many.shared[t], field))
        with torch.no_grad():
            ebc.embedding_bags["t1"].weight[123, 2] = float("nan")
        with pytest.raises(ValueError, match="table 't1', rows from 0: row 123 of the weights is not finite"):
            quantize_(ebc, config, priorities=prio)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_large_group_chooses_its_centroid_count_on_a_sample(monkeypatch) -> None:
    """``shared_sample_rows``: a group with more rows is decided on a seeded sample of that
    many rows (every candidate ``K``, the price's rounds, the refits) and only its final
    centroids are assigned to every row: the same ``K`` as measuring every row on these
    well-clustered tables, every row read as its nearest centroid, the budget held, the weighted error as low; a non-finite
    row outside the sample is still named."""
    from shark_torchrec.quant import shared_rows as S

    ebc = _clustered_collection(16)  # t0: 4,000 rows (sampled below), t1: 600 (whole)
    prio = {c.name: torch.rand(c.num_embeddings, generator=torch.Generator().manual_seed(2)) ** 3
            for c in ebc.embedding_bag_configs()}
    fp32 = sum(c.num_embeddings * 64 for c in ebc.embedding_bag_configs())
    assigned = []
    real = S._assign
    monkeypatch.setattr(S, "_assign", lambda w, c: (assigned.append((w.shape[0], c.shape[0])), real(w, c))[1])

    def compress(sample_rows):
        assigned.clear()
        config = RowwiseQuantConfig(budget_fraction=0.1, tiers=("fp16", "int8", "int4", "int2", "shared"),
                                    row_alignment=1, shared_sample_rows=sample_rows)
        m = quantize_(ebc, config, priorities=prio)
        assert m.memory_report()["total_bytes"] <= int(0.1 * fp32)
        return m, list(assigned)

    exact, every = compress(None)
    sampled, some = compress(1000)
    k0 = sampled.assignment.shared["t0"].k
    assert k0 == exact.assignment.shared["t0"].k and k0 >= 16

    # exact: each of t0's five candidates assigned to all 4,000 rows, and each K a round takes
    # and its refits again; sampled: every candidate and refit to 1,000 of them, and all 4,000
    # rows once, to the final centroids
    assert {k for n, k in every if n == 4000} == {1, 4, 16, 64, 256}
    on_sample = [k for n, k in some if n == 1000]
    assert sorted(on_sample[:5]) == [1, 4, 16, 64, 256] and set(on_sample[5:]) <= {k0}
    assert [k for n, k in some if n == 4000] == [k0]
    s = sampled.assignment.shared["t0"]
    assert s.rows is None and s.index.numel() == 4000
    w = ebc.embedding_bags["t0"].weight.detach()
    d = ((w.double().unsqueeze(1) - s.centroids.double().unsqueeze(0)) ** 2).sum(2)
    assert torch.equal(s.index.long(), d.argmin(1))
    torch.testing.assert_close(s.error, d.min(1).values.float(), rtol=1e-6, atol=0)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.tensor([5, 3999, 3]), torch.tensor([2, 1]))
    table = _reference(w, sampled.assignment.tiers["t0"], s)
    torch.testing.assert_close(sampled(kjt)["f0"][0], table[5] + table[3999])
    # (its refits fitted to half of the sample's SHARED rows, judged on the other half: here 15
    # sample rows per centroid, 1.05x; at the default 131,072 rows and K <= 1,024, 128 per
    # centroid, the same error as exact on the benchmark's million-row tables)
    assert _weighted_error(ebc, sampled, prio) <= 1.10 * _weighted_error(ebc, exact, prio)
    with torch.no_grad():
        ebc.embedding_bags["t0"].weight[3999, 2] = float("nan")
    with pytest.raises(ValueError, match="row 3999 of the weights is not finite"):
        compress(1000)
    with pytest.raises(ValueError, match="shared_sample_rows must be a row count"):
        RowwiseQuantConfig(budget_fraction=0.1, shared_sample_rows=0)


def test_a_sampled_budget_that_fails_is_decided_on_every_row(monkeypatch) -> None:
    """Where deciding on the samples hits a BudgetError (their estimate of the least bytes is
    off near the budget), every row decides: the tiers and centroids of the exact way."""
    import shark_torchrec.sharded.assign as A
    from shark_torchrec.quant.tiers import BudgetError

    ebc = _clustered_collection(16)
    prio = {c.name: torch.rand(c.num_embeddings, generator=torch.Generator().manual_seed(2)) ** 3
            for c in ebc.embedding_bag_configs()}
    config = dict(budget_fraction=0.1, tiers=("fp16", "int8", "int4", "int2", "shared"), row_alignment=1)
    exact = quantize_(ebc, RowwiseQuantConfig(**config, shared_sample_rows=None), priorities=prio).assignment
    real = A._Assigner.refine
    failed = []

    def refine(self, *args):
        if self.on_sample:
            failed.append(sorted(self.on_sample))
            raise BudgetError("estimated below its least bytes")
        return real(self, *args)

    monkeypatch.setattr(A._Assigner, "refine", refine)
    got = quantize_(ebc, RowwiseQuantConfig(**config, shared_sample_rows=1000), priorities=prio).assignment
    assert failed == [[("t0", 0)]]
    for t in ("t0", "t1"):
        assert torch.equal(got.tiers[t], exact.tiers[t])
        assert torch.equal(got.shared[t].centroids, exact.shared[t].centroids)
