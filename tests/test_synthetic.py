"""Synthetic click data: determinism, world-size invariance, Zipf ids, planted fields."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from shark_torchrec.data import SyntheticClickDataset, SyntheticConfig, SyntheticField, make_dataloader


def _cfg(seed=0, **kw) -> SyntheticConfig:
    return SyntheticConfig.default(num_fields=10, num_informative=3, cardinality=1000,
                                   multi_hot_fields=2, max_hot=4, seed=seed, **kw)


def _same(a, b) -> bool:
    return (torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
            and torch.equal(a.sparse_features.values(), b.sparse_features.values())
            and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths()))


def test_deterministic_given_seed() -> None:
    a = list(SyntheticClickDataset(_cfg(seed=5), 64, 3))
    b = list(SyntheticClickDataset(_cfg(seed=5), 64, 3))
    c = list(SyntheticClickDataset(_cfg(seed=6), 64, 3))
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not any(_same(x, y) for x, y in zip(a, c))
    assert not _same(a[0], a[1])


def test_independent_of_world_size_and_workers() -> None:
    cfg = _cfg()
    whole = list(SyntheticClickDataset(cfg, 64, 4))
    for g in range(4):
        parts = [list(SyntheticClickDataset(cfg, 16, 4, rank=r, world_size=4))[g] for r in range(4)]
        kjts = [p.sparse_features for p in parts]
        for key in cfg.feature_names:
            ref = whole[g].sparse_features[key]
            assert torch.cat([k[key].values() for k in kjts]).tolist() == ref.values().tolist()
            assert torch.cat([k[key].lengths() for k in kjts]).tolist() == ref.lengths().tolist()
        assert torch.equal(torch.cat([p.labels for p in parts]), whole[g].labels)
    loaded = list(make_dataloader(SyntheticClickDataset(cfg, 64, 4), num_workers=2))
    assert all(_same(x, y) for x, y in zip(loaded, whole))
    resumed = list(SyntheticClickDataset(cfg, 64, 4, start_batch=2))
    assert _same(resumed[0], whole[2]) and len(resumed) == 2


def test_ids_lengths_and_zipf_skew() -> None:
    cfg = SyntheticConfig(fields=[SyntheticField("z", 5000, zipf_exponent=1.2),
                                  SyntheticField("u", 5000, zipf_exponent=0.0),
                                  SyntheticField("m", 100, min_hot=2, max_hot=5)],
                          informative=["z"], num_dense=2)
    b = SyntheticClickDataset(cfg, 20000, 1).global_batch(0)
    kjt = b.sparse_features
    for key, card in (("z", 5000), ("u", 5000), ("m", 100)):
        v = kjt[key].values()
        assert v.min() >= 0 and v.max() < card
    lens = kjt["m"].lengths()
    assert lens.min() == 2 and lens.max() == 5
    # Power law: the top id's share is the mass of x^-s on [1, 2) out of [1, n + 1).
    counts = np.sort(np.bincount(kjt["z"].values().numpy(), minlength=5000))[::-1]
    share = lambda k: (k ** -0.2 - (k + 1) ** -0.2) / (1 - 5001 ** -0.2)  # noqa: E731
    assert counts[0] / counts.sum() == pytest.approx(share(1), rel=0.05)
    assert counts[9] / counts.sum() == pytest.approx(share(10), rel=0.2)
    uniform = np.bincount(kjt["u"].values().numpy(), minlength=5000)
    assert uniform.max() / uniform.sum() < 5 * (1 / 5000) * 3


def _field_auc(train, test, key: str) -> float:
    """Held-out AUC of a target-mean encoding of one field (mean over a bag's ids)."""
    ids_tr = train.sparse_features[key]
    bag = torch.repeat_interleave(torch.arange(train.labels.numel()), ids_tr.lengths())
    v = ids_tr.values()
    card = int(max(v.max(), test.sparse_features[key].values().max())) + 1
    pos = torch.zeros(card).index_add_(0, v, train.labels[bag])
    cnt = torch.zeros(card).index_add_(0, v, torch.ones_like(v, dtype=torch.float))
    prior = train.labels.mean()
    rate = (pos + 10 * prior) / (cnt + 10)
    ids_te = test.sparse_features[key]
    bag_te = torch.repeat_interleave(torch.arange(test.labels.numel()), ids_te.lengths())
    score = torch.zeros(test.labels.numel()).index_add_(0, bag_te, rate[ids_te.values()])
    score = score / ids_te.lengths().clamp(min=1)
    return binary_auroc(score, test.labels.long()).item()


def test_planted_fields_drive_the_label() -> None:
    cfg = _cfg(seed=2)
    ds = SyntheticClickDataset(cfg, 20000, 2)
    train, test = ds.global_batch(0), ds.global_batch(1)
    assert 0.15 < train.labels.mean() < 0.6
    aucs = {f: _field_auc(train, test, f) for f in cfg.feature_names}
    informative = [aucs[f] for f in cfg.informative]
    noise = [aucs[f] for f in cfg.noise_fields]
    assert min(informative) > 0.56, aucs
    assert max(noise) < 0.53, aucs
    assert min(informative) > max(noise)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown fields: \['nope'\]"):
        SyntheticConfig(fields=[SyntheticField("a", 10)], informative=["nope"])
    with pytest.raises(ValueError, match="'b': cardinality"):
        SyntheticField("b", 0)


@pytest.mark.parametrize("n", [1, 2, 12, 1000, 7919, 65536])
def test_id_scatter_is_a_bijection(n: int) -> None:
    from shark_torchrec.data.synthetic import _scatter

    for salt in (0, 1, 12345):
        out = np.asarray(_scatter(np.arange(n), n, salt))
        assert np.array_equal(np.sort(out), np.arange(n))


def test_criteo_layout_constant_and_near_constant_fields() -> None:
    from shark_torchrec.data import criteo_config

    cfg = criteo_config(seed=1, max_rows=50_000)
    assert len(cfg.fields) == 26 and cfg.num_dense == 13
    assert max(cfg.num_embeddings_per_feature) == 50_000 and min(cfg.num_embeddings_per_feature) == 3
    b = SyntheticClickDataset(cfg, 20_000, 1).global_batch(0)
    for f in ("cat_8", "cat_19"):  # constant: one value in every row
        assert b.sparse_features[f].values().unique().numel() == 1
    for f, m in (("cat_16", 0.995), ("cat_21", 0.99)):
        v = b.sparse_features[f].values()
        mode_share = float((v == v.mode().values).float().mean())
        # the mode is also the most likely Zipf draw: share = m + (1 - m) * P_zipf(rank 0)
        n = cfg.fields[int(f[4:])].cardinality
        zipf0 = (2 ** -0.05 - 1) / ((n + 1) ** -0.05 - 1)
        assert mode_share == pytest.approx(m + (1 - m) * zipf0, abs=0.003)
        assert v.unique().numel() > 1
    assert 0.15 < float(b.labels.mean()) < 0.4


def test_id_probabilities_match_the_generator() -> None:
    for field in (SyntheticField("z", 300, zipf_exponent=1.05, mode_probability=0.3),
                  SyntheticField("u", 300, zipf_exponent=0.0), SyntheticField("one", 300, zipf_exponent=1.0)):
        cfg = SyntheticConfig(fields=[field], informative=[], num_dense=0)
        v = SyntheticClickDataset(cfg, 200_000, 1).global_batch(0).sparse_features[field.name].values()
        from shark_torchrec.data.synthetic import _scatter

        ids = np.asarray(_scatter(np.arange(300), 300, 0))
        p = np.zeros(300)
        p[ids] = field.id_probabilities()
        assert p.sum() == pytest.approx(1.0)
        empirical = np.bincount(v.numpy(), minlength=300) / v.numel()
        assert np.abs(empirical - p).max() < 0.004, field


def test_true_field_importance_is_zero_exactly_for_fields_without_effect() -> None:
    from shark_torchrec.data import criteo_config, true_field_importance

    cfg = criteo_config(seed=0, max_rows=20_000)
    truth = true_field_importance(cfg, num_examples=20_000)
    for f in cfg.feature_names:
        if f in cfg.informative:
            assert truth[f] > 0, f
        else:
            assert truth[f] == 0.0, f
    # a stronger weight means more importance (same cardinality class, no interactions)
    assert truth["cat_0"] > truth["cat_1"]


def test_true_field_importance_equals_a_direct_monte_carlo() -> None:
    """Independent reference: regenerate the data with one field's effects re-drawn from other
    examples and measure the Bayes predictor's expected log-loss increase directly."""
    from shark_torchrec.data import true_field_importance
    from shark_torchrec.data.synthetic import hashed_normal

    cfg = SyntheticConfig(fields=[SyntheticField("a", 500), SyntheticField("b", 500)],
                          informative=["a"], num_dense=0, signal=1.0, bias=-0.5)
    got = true_field_importance(cfg, num_examples=50_000)
    assert got["b"] == 0.0
    # by hand: logit = bias + w_a(id); the permuted logit uses an independent example's id
    b = SyntheticClickDataset(cfg, 50_000, 1).global_batch(0)
    ids = b.sparse_features["a"].values().numpy()
    w = hashed_normal(ids, salt=(0 << 20) ^ 1)
    logit = -0.5 + w
    q = -0.5 + np.random.default_rng(0).permutation(w)
    p = 1 / (1 + np.exp(-logit))
    kl = p * (np.log(p) - np.log(1 / (1 + np.exp(-q)))) + (1 - p) * (np.log(1 - p) - np.log(1 - 1 / (1 + np.exp(-q))))
    assert got["a"] == pytest.approx(kl.mean(), rel=0.05)


def test_true_row_importance_marks_exactly_the_active_rows() -> None:
    from shark_torchrec.data import true_row_importance

    field = SyntheticField("a", 2_000, active_fraction=0.25)
    cfg = SyntheticConfig(fields=[field, SyntheticField("b", 100)], informative=["a"], num_dense=0)
    r = true_row_importance(cfg, "a")
    assert (r > 0).mean() == pytest.approx(0.25, abs=0.03)
    assert np.all(true_row_importance(cfg, "b") == 0)
    # rows without an effect never move the label: their ids' empirical label rate equals the
    # overall one, while active rows' rates spread
    batch = SyntheticClickDataset(cfg, 200_000, 1).global_batch(0)
    ids = batch.sparse_features["a"].values().numpy()
    y = batch.labels.numpy()
    inactive = r[ids] == 0
    assert abs(y[inactive].mean() - 1 / (1 + np.exp(1.0))) < 0.01  # bias -1, no effect


def test_true_row_importance_is_each_rows_mean_squared_contribution() -> None:
    """Against a Monte-Carlo count on generated examples: each occurrence's contribution to the
    true logit, ``(c_own(id) + Σ s · h(id) · f_partner) / L``, squared and summed per id.  The
    formula took the partners' factors as mean 0, variance 1; under their real (Zipf) id laws
    they are neither, which overstated interacting fields' rows by up to 27% (audit)."""
    from shark_torchrec.data import true_row_importance
    from shark_torchrec.data.synthetic import _interaction_factors, _row_effects, _sample

    fields = [SyntheticField("a", 40, min_hot=0, max_hot=2), SyntheticField("b", 15, zipf_exponent=1.6, max_hot=3),
              SyntheticField("c", 25, zipf_exponent=1.3)]
    cfg = SyntheticConfig(fields=fields, informative=["a", "b", "c"], num_dense=0,
                          interactions=[("a", "b", 0.8), ("a", "c", -0.6)])
    n = 400_000
    _, lengths, values, parts = _sample(cfg, 7, n)
    lens, ids = lengths[0], values[0]
    example = np.repeat(np.arange(n), lens)
    total = cfg.signal * cfg.weight("a") * _row_effects(cfg, 0, ids)
    h = _interaction_factors(cfg, 0, ids)
    for _, partner, s in cfg.interactions:
        total = total + s * h * parts.factor[partner][example]
    contribution = total / lens[example]
    empirical = np.bincount(ids, weights=contribution ** 2, minlength=40) / n
    truth = true_row_importance(cfg, "a")
    top = np.argsort(-truth)[:8]
    np.testing.assert_allclose(empirical[top], truth[top], rtol=0.05)
    assert truth.sum() == pytest.approx(empirical.sum(), rel=0.03)
