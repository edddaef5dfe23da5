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
