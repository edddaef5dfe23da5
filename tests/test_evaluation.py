"""Paired comparisons, seed summaries and ranking agreement, against direct computations."""

import itertools

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from shark_torchrec.evaluation import (
    auc,
    paired_compare,
    recall_at_k,
    spearman,
    summarize_seeds,
    verdict,
)


def _pairs_auc(s, y, w=None):
    """AUC by enumerating every (positive, negative) pair: the definition."""
    w = np.ones(len(s)) if w is None else w
    num = den = 0.0
    for i, j in itertools.product(range(len(s)), repeat=2):
        if y[i] == 1 and y[j] == 0:
            pair = w[i] * w[j]
            num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += pair
    return num / den


def test_auc_with_ties_and_weights_equals_pair_enumeration() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    y = (rng.random(60) < 0.4).astype(float)
    assert auc(s, y) == pytest.approx(_pairs_auc(s, y), abs=1e-12)
    assert auc(s, y) == pytest.approx(float(binary_auroc(torch.tensor(s), torch.tensor(y).long())), abs=1e-6)
    from shark_torchrec.evaluation import _SortedScores

    w = rng.integers(0, 3, 60).astype(float)
    assert _SortedScores(s, y).auc(w[None])[0] == pytest.approx(_pairs_auc(s, y, w), abs=1e-12)


def test_auc_counts_exactly_past_float32s_integers() -> None:
    """Weights whose running sums pass 2^24 (a test set of more than 16.8M rows: the bootstrap's
    resample counts over it) are counted exactly: float32 sums stopped counting there."""
    from shark_torchrec.evaluation import _SortedScores

    rng = np.random.default_rng(1)
    s = rng.integers(0, 50, 300).astype(float)
    y = (rng.random(300) < 0.4).astype(float)
    w = (rng.integers(50_000, 150_000, 300) * 2 + 1).astype(np.float32)  # odd: exact in float32
    assert _SortedScores(s, y).auc(w[None])[0] == pytest.approx(_pairs_auc(s, y, w.astype(float)), abs=1e-12)


def test_resamples_of_one_class_are_left_out_and_no_interval_is_no_verdict() -> None:
    """On 40 rows with 2 positives, about one resample in eight holds no positive: those have no
    AUC and are left out of the interval (they made it NaN, which the verdict called a gain); a
    NaN interval is called undetermined."""
    rng = np.random.default_rng(3)
    y = np.zeros(40)
    y[[5, 30]] = 1
    good = rng.normal(size=40) + 3 * y
    worse = good - 4 * y  # the positives ranked low
    c = paired_compare(y, good, worse, bootstrap=200, seed=0)
    assert all(np.isfinite(c.delta_auc_ci)) and c.delta_auc_ci[1] < 0
    assert "a loss" in verdict(c.delta_auc, c.delta_auc_ci)
    assert "undetermined" in verdict(-0.2, [float("nan"), float("nan")])


def test_paired_interval_covers_and_is_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    z = rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    ref = z + 0.5 * rng.standard_normal(n)
    same = paired_compare(y, ref, ref, bootstrap=200, seed=0)
    assert same.delta_auc == 0 and same.delta_auc_ci == [0.0, 0.0]
    worse = ref + 0.3 * rng.standard_normal(n)  # a slightly noisier model
    c = paired_compare(y, ref, worse, bootstrap=300, seed=0)
    assert c.delta_auc == pytest.approx(auc(worse, y) - auc(ref, y))
    lo, hi = c.delta_auc_ci
    assert lo <= c.delta_auc <= hi < 0  # a real loss, resolved
    # the paired interval is much narrower than either AUC's own standard error (~0.004 here)
    assert hi - lo < 0.006
    ll = np.mean(np.logaddexp(0, worse) - y * worse) - np.mean(np.logaddexp(0, ref) - y * ref)
    assert c.delta_log_loss == pytest.approx(ll)
    assert "a loss" in c.verdict()


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        paired_compare([0, 1], [0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="all 1"):
        paired_compare([1, 1], [0.1, 0.2], [0.1, 0.2])


def test_seed_summary_and_verdict_words() -> None:
    s = summarize_seeds([0.001, -0.001, 0.003])
    assert s.mean == pytest.approx(0.001) and s.std == pytest.approx(0.002)
    assert s.ci[0] == pytest.approx(0.001 - 4.303 * 0.002 / np.sqrt(3))
    assert "within noise" in verdict(-0.001, [-0.003, 0.001])
    assert "not excluded" in verdict(-0.001, [-0.003, 0.001])
    assert "losses larger than 0.002 excluded" in verdict(-0.0005, [-0.0015, 0.0005])


def test_rank_agreement() -> None:
    truth = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    assert spearman({"a": 30, "b": 20, "c": 10, "d": 0}, truth) == pytest.approx(1.0)
    assert spearman({"a": 0, "b": 1, "c": 2, "d": 3}, truth) == pytest.approx(-1.0)
    assert recall_at_k({"a": 5, "b": 0, "c": 4, "d": 1}, ["a", "b"]) == 0.5


def test_stage_auc_ranks_large_logits_as_the_paired_comparison_does() -> None:
    """evaluate_model's AUC reads the logits' order: logits above ~16.6, equal after a float32
    sigmoid, are not ties (they were: the stage AUC disagreed with the paired comparison's)."""
    from shark_torchrec.evaluation import auc
    from shark_torchrec.training.distributed import DistEnv
    from shark_torchrec.training.trainer import evaluate_model

    logits = torch.tensor([17.0, 18.0, 20.0, 25.0, -1.0, 19.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    assert float(torch.sigmoid(logits[:4]).unique().numel()) == 1  # all 1.0 in float32
    out = evaluate_model(lambda b: (None, (None, logits, labels)), [0], DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    # (torchmetrics returns float32)
    assert out["auc"] == pytest.approx(auc(logits.numpy(), labels.numpy()), abs=1e-6)
    assert out["auc"] == pytest.approx(_pairs_auc(logits.numpy(), labels.numpy()), abs=1e-6)


def test_seed_interval_uses_the_t_quantile_of_its_degrees_of_freedom() -> None:
    """Beyond 31 seeds the interval used t(30) = 2.042; t(60) is 2.000298 (a table's value)."""
    values = [float(i % 7) for i in range(61)]
    s = summarize_seeds(values)
    half = (s.ci[1] - s.ci[0]) / 2
    assert half == pytest.approx(2.000298 * s.std / np.sqrt(61), rel=2e-5)
    few = summarize_seeds([1.0, 2.0, 4.0])
    assert (few.ci[1] - few.ci[0]) / 2 == pytest.approx(4.303 * few.std / np.sqrt(3), rel=1e-12)
