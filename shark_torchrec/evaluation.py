"""Judging compression by its quality: paired comparisons with confidence intervals, summaries
over seeds, and agreement of scores with a known ground truth.

A compressed model is compared with its uncompressed reference **on the same test rows**: the
AUC difference and the log-loss difference come with a bootstrap confidence interval over the
rows (both models scored on each resample, so the row-to-row noise that both share cancels).
Over seeds, :func:`summarize_seeds` gives the mean, the spread and a t-interval of the mean.
:func:`verdict` says in words whether a change is within noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (95% intervals).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class _SortedScores:
    """One model's scores sorted once, with their tie groups, so that the AUC under any row
    weights (a bootstrap resample) is a few vectorised passes."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        s = scores[self.order]
        # float64: the products with the (float32) weights, their sums within tie groups and the
        # running count of negatives go past 2^24 on large test sets, where float32 stops counting
        self.y = labels[self.order].astype(np.float64)
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] != s[:-1]
        self.starts = np.flatnonzero(new)
        self.ties = len(self.starts) < len(s)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """AUC for each row of ``weights`` ``[R, n]`` (weights in the original row order):
        ``P(score_pos > score_neg) + ½ P(tie)`` with pairs weighted by the rows' weights."""
        w = np.take(weights, self.order, axis=1)
        pos, neg = w * self.y, w * (1 - self.y)
        if self.ties:  # sum within tie groups (contiguous once sorted)
            pos = np.add.reduceat(pos, self.starts, axis=1)
            neg = np.add.reduceat(neg, self.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each tie group
        num = (pos * (below + 0.5 * neg)).sum(1, dtype=np.float64)
        return num / (pos.sum(1, dtype=np.float64) * neg.sum(1, dtype=np.float64))


def auc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """ROC AUC with ties counted half (equals ``torchmetrics``' ``binary_auroc``)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    _check(s, y, "scores")
    return float(_SortedScores(s, y).auc(np.ones((1, len(s))))[0])


def _check(scores: np.ndarray, labels: np.ndarray, name: str) -> None:
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"{name}: {scores.shape} scores for {labels.shape} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: {int((~np.isfinite(scores)).sum())} non-finite scores")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    if labels.min() == labels.max():
        raise ValueError(f"labels are all {labels[0]:g}: AUC is undefined")


def _log_loss_rows(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # BCE with logits, stable: log(1 + e^x) - y x
    return np.logaddexp(0.0, logits) - labels * logits


@dataclass
class PairedComparison:
    """A model against its reference on the same rows.

    Attributes:
        examples: test rows.
        auc_reference, auc: the two AUCs.
        delta_auc: ``auc - auc_reference``; ``delta_auc_ci``: its bootstrap interval.
        log_loss_reference, log_loss, delta_log_loss, delta_log_loss_ci: the same for log loss.
        level: the interval's coverage; ``bootstrap``: resamples; ``seed``: their seed.
    """

    examples: int
    auc_reference: float
    auc: float
    delta_auc: float
    delta_auc_ci: List[float]
    log_loss_reference: float
    log_loss: float
    delta_log_loss: float
    delta_log_loss_ci: List[float]
    level: float
    bootstrap: int
    seed: int

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def verdict(self, tolerance: float = 0.002) -> str:
        return verdict(self.delta_auc, self.delta_auc_ci, tolerance)


class PairedBootstrap:
    """Several models scored on the same rows, resampled together: every comparison between
    two of them uses the same bootstrap resamples, and each model's AUC is computed once per
    resample however many comparisons it enters.

    Args:
        labels: the rows' 0/1 labels.
        logits: ``{model name: logits}`` on those rows.
        bootstrap: resamples (rows drawn with replacement).
        seed: seeds the resamples.
    """

    def __init__(self, labels: Sequence[float], logits: Dict[str, Sequence[float]],
                 bootstrap: int = 1000, seed: int = 0) -> None:
        y = np.asarray(labels, dtype=np.float64).ravel()
        self.n, self.bootstrap, self.seed = len(y), bootstrap, seed
        if bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1, got {bootstrap}")
        scores = {}
        for name, lg in logits.items():
            x = np.asarray(lg, dtype=np.float64).ravel()
            _check(x, y, f"logits of {name!r}")
            scores[name] = x
        sorted_ = {name: _SortedScores(x, y) for name, x in scores.items()}
        self.loss = {name: _log_loss_rows(x, y) for name, x in scores.items()}
        ones = np.ones((1, self.n), dtype=np.float32)
        self.auc = {name: float(s.auc(ones)[0]) for name, s in sorted_.items()}
        rng = np.random.default_rng(seed)
        aucs: Dict[str, List[np.ndarray]] = {name: [] for name in scores}
        sums: List[np.ndarray] = []
        losses: Dict[str, List[np.ndarray]] = {name: [] for name in scores}
        chunk = max(1, min(bootstrap, 4_000_000 // max(self.n, 1)))  # bounds the [R, n] weights
        done = 0
        while done < bootstrap:
            r = min(chunk, bootstrap - done)
            # Multinomial resample counts; float32 holds each exactly and halves the traffic (every
            # sum of them is taken in float64).
            w = np.stack([np.bincount(rng.integers(0, self.n, self.n), minlength=self.n)
                          for _ in range(r)]).astype(np.float32)
            for name, s in sorted_.items():
                aucs[name].append(s.auc(w))
                losses[name].append(w @ self.loss[name])
            sums.append(w.sum(1, dtype=np.float64))
            done += r
        self._aucs = {name: np.concatenate(v) for name, v in aucs.items()}
        total = np.concatenate(sums)
        self._losses = {name: np.concatenate(v) / total for name, v in losses.items()}

    def compare(self, reference: str, model: str, level: float = 0.95) -> PairedComparison:
        """``model`` against ``reference``: differences with percentile intervals."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        d_auc = self._aucs[model] - self._aucs[reference]
        # A resample holding one class only has no AUC: the interval is of the others (none
        # left: NaN, which verdict() calls undetermined).
        undefined = int(np.isnan(d_auc).sum())
        if undefined:
            logger.warning("%d of %d bootstrap resamples hold one class only (no AUC): the AUC interval "
                           "is of the other %d", undefined, d_auc.size, d_auc.size - undefined)
            d_auc = d_auc[~np.isnan(d_auc)]
        d_ll = self._losses[model] - self._losses[reference]
        la, lb = self.loss[reference], self.loss[model]
        return PairedComparison(
            examples=self.n, auc_reference=self.auc[reference], auc=self.auc[model],
            delta_auc=self.auc[model] - self.auc[reference],
            delta_auc_ci=[float(x) for x in np.percentile(d_auc, q)] if d_auc.size else [math.nan, math.nan],
            log_loss_reference=float(la.mean()), log_loss=float(lb.mean()),
            delta_log_loss=float(lb.mean() - la.mean()),
            delta_log_loss_ci=[float(x) for x in np.percentile(d_ll, q)],
            level=level, bootstrap=self.bootstrap, seed=self.seed,
        )


def paired_compare(
    labels: Sequence[float],
    reference_logits: Sequence[float],
    logits: Sequence[float],
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare ``logits`` with ``reference_logits`` on the same rows: AUC and log-loss
    differences with percentile bootstrap intervals (rows resampled with replacement, both
    models scored on every resample).  :class:`PairedBootstrap` compares several models."""
    boot = PairedBootstrap(labels, {"reference": reference_logits, "model": logits},
                           bootstrap=bootstrap, seed=seed)
    return boot.compare("reference", "model", level)


def verdict(delta: float, ci: Sequence[float], tolerance: float = 0.002) -> str:
    """In words: is an AUC change within noise, a loss or a gain, and does its interval exclude
    losses larger than ``tolerance``?"""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return (f"ΔAUC {delta:+.4f} [{lo:+.4f}, {hi:+.4f}]: undetermined (no interval: the rows, or every "
                "resample of them, hold one class only)")
    if lo <= 0 <= hi:
        kind = "within noise (the interval includes 0)"
    elif hi < 0:
        kind = "a loss (the interval excludes 0)"
    else:
        kind = "a gain (the interval excludes 0)"
    bound = (f"losses larger than {tolerance:g} excluded" if lo >= -tolerance
             else f"a loss larger than {tolerance:g} not excluded")
    return f"ΔAUC {delta:+.4f} [{lo:+.4f}, {hi:+.4f}]: {kind}; {bound}"


def _t975(df: int) -> float:
    """Student's t 97.5% quantile: the table up to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal's (within 1e-4 from 30 on; t(30) for every larger
    ``df`` made the intervals of many seeds up to 2% too wide)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass
class SeedSummary:
    """Mean, sample standard deviation, range and a t-interval of the mean over seeds."""

    values: List[float]
    mean: float
    std: float
    min: float
    max: float
    ci: List[float]

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def summarize_seeds(values: Iterable[float], level: float = 0.95) -> SeedSummary:
    """Summary of one quantity over seeds (``level`` 0.95 only for the t-interval)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("summarize_seeds: no values")
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    if len(v) > 1 and level == 0.95:
        half = _t975(len(v) - 1) * std / math.sqrt(len(v))
        ci = [mean - half, mean + half]
    else:
        ci = [float("nan"), float("nan")]
    return SeedSummary(values=v, mean=mean, std=std, min=min(v), max=max(v), ci=ci)


def spearman(scores: Dict[str, float], truth: Dict[str, float]) -> float:
    """Spearman rank correlation of two score dicts over the same keys (average ranks on ties)."""
    if set(scores) != set(truth):
        raise ValueError(f"spearman: keys differ: {sorted(set(scores) ^ set(truth))}")
    keys = sorted(scores)
    ra = _ranks(np.array([scores[k] for k in keys], dtype=np.float64))
    rb = _ranks(np.array([truth[k] for k in keys], dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def recall_at_k(scores: Dict[str, float], relevant: Iterable[str], k: Optional[int] = None) -> float:
    """Fraction of the ``relevant`` keys among the ``k`` highest-scoring keys (``k`` defaults
    to the number of relevant keys; ties broken by name, which favours no method)."""
    rel = set(relevant)
    if not rel:
        return float("nan")
    k = len(rel) if k is None else k
    top = sorted(scores, key=lambda f: (-scores[f], f))[:k]
    return len(rel & set(top)) / len(rel)


def bottom_k(scores: Dict[str, float], k: int) -> List[str]:
    """The ``k`` lowest-scoring keys (ties broken by name)."""
    return sorted(scores, key=lambda f: (scores[f], f))[:k]
