"""Shared rows: the SHARED tier's centroids (shared rows instead of dropped rows).

A row in the SHARED tier stores nothing of its own: its id-map entry points at one of ``K``
centroid rows of its table (of its shard, in a sharded model), stored FP16 after the table's
FP16 rows.  It reads as its cluster's centroid where a DROP row reads as zeros.  ``K = 1`` is the
table's priority-weighted mean row.

The centroids are a priority-weighted k-means of the fp32 rows (k-means++ seeds drawn from at
most :data:`SEED_ROWS` rows of the sample, then faiss's Lloyd iterations on all cores), trained
on a sample of at most :data:`SAMPLE_PER_CENTROID` rows per centroid — of all the table's rows,
or of some (``among``: the byte budget refits them to the rows it put in the SHARED tier, the
only ones that read them); then every row is assigned to its nearest centroid *as stored*
(fp16), in chunks.
Memory: the sample, the centroids and 6 bytes per row assigned.  Which ``K`` a table gets is the
byte budget's choice (:mod:`~shark_torchrec.sharded.assign`: the ``K`` among
:data:`K_CANDIDATES` with the least Lagrangian cost at the budget's price, centroids' bytes
included, measured on a sample of the rows of a large table: ``assign_only``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

#: Centroids per table (per shard) the byte budget chooses from (a table takes those up to a
#: quarter of its rows).
K_CANDIDATES = (1, 4, 16, 64, 256, 1024)
#: Rows k-means trains on, per centroid (faiss's default cap is 256; 64 keeps K = 1024 on a
#: large table to seconds, and faiss warns only below 39).
SAMPLE_PER_CENTROID = 64
#: Sample rows k-means++ draws its seeds from, at most (a random part of the training sample
#: where that is larger): each seed is a pass over them, so K = 1,024 on the full 65,536-row
#: sample took 6.4 of the 9.6 s of a 131,072-row shard's clustering; 16 rows per seed still
#: seeds every cluster, and Lloyd's iterations then run on the whole sample.
SEED_ROWS = 16_384
#: Rows read at a time (the finiteness check).
CHUNK_ROWS = 65_536
#: Rows read at a time for the weighted mean (K = 1): a float64 chunk that stays in the cache.
MEAN_ROWS = 4_096
#: Rows assigned to centroids at a time: their scores against 1,024 centroids (16 MB) stay in
#: the cache for the minimum (65,536 rows at a time took 2.1x as long, the same result).
ASSIGN_ROWS = 4_096
#: k-means iterations (Lloyd's, by faiss, from k-means++ seeds).
ITERATIONS = 20


@dataclasses.dataclass
class SharedRows:
    """The centroids of one table (or shard) and each row's nearest one.

    Attributes:
        centroids: float32 [K, dim], fp16-representable: what a SHARED row reads as.
        index: [rows] each row's nearest centroid (int16; int32 beyond 32,767 centroids).
        error: float32 [rows], each row's squared distance to it (its SHARED-tier error,
            measured in float64).
    """

    centroids: torch.Tensor
    index: torch.Tensor
    error: torch.Tensor
    #: The rows ``index`` and ``error`` cover (sorted), where only a sample of the rows was
    #: assigned (a candidate ``K`` measured on a sample: see
    #: :class:`~shark_torchrec.quant.config.RowwiseQuantConfig`'s ``shared_sample_rows``);
    #: ``None``: every row.  Only centroids whose rows are all assigned are stored.
    rows: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def _as_float(weights: torch.Tensor) -> torch.Tensor:
    w = weights.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu":
        w = w.float().cpu()
    return w


def _check_finite(w: torch.Tensor, r0: int, rows: Optional[torch.Tensor] = None) -> None:
    """Raise naming the first non-finite row of ``w``: row ``r0 + i``, or ``rows[i]`` where
    ``w`` holds those rows."""
    bad = ~torch.isfinite(w).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"row {r0 + i if rows is None else int(rows[i])} of the weights is not finite")


def _assign(weights: torch.Tensor, centroids: torch.Tensor) -> tuple:
    """Nearest centroid and squared distance of every row, :data:`ASSIGN_ROWS` at a time: the
    nearest by one float32 matrix product (``|c|^2 - 2 w.c``), its distance then measured in
    float64 (both by the ``nearest_centroid`` kernel where it is built).  Raises ``ValueError``
    naming the first non-finite row."""
    from shark_torchrec.quant.cpu_kernel import cpu_kernel_available

    n = weights.shape[0]
    index = torch.empty(n, dtype=torch.int16 if centroids.shape[0] <= 32767 else torch.int32)
    error = torch.empty(n, dtype=torch.float32)
    c = centroids.float().contiguous()
    c_norm = (c.double() * c.double()).sum(1).float().unsqueeze(0)
    c64 = c.double()
    kernel = cpu_kernel_available()
    # (one score buffer for every chunk: a fresh 16 MB block per chunk was mapped and faulted in
    # anew each time, 1.85x the time of the whole assignment at K = 1,024; the same results)
    buf = torch.empty(min(n, ASSIGN_ROWS), c.shape[0])
    for r0 in range(0, n, ASSIGN_ROWS):
        w = _as_float(weights[r0:r0 + ASSIGN_ROWS])
        scores = torch.addmm(c_norm, w, c.t(), alpha=-2.0, out=buf[:w.shape[0]])
        if kernel:
            nearest, e = torch.ops.shark_torchrec.nearest_centroid(scores, w.contiguous(), c)
        else:
            nearest = torch.argmin(scores, 1)
            d = w.double().sub_(c64.index_select(0, nearest))
            e = d.mul_(d).sum(1)
        if not bool(torch.isfinite(e).all()):  # (a row holding NaN or Inf; finite rows' sums are)
            _check_finite(w, r0)
        index[r0:r0 + w.shape[0]] = nearest.to(index.dtype)
        error[r0:r0 + w.shape[0]] = e
    return index, error


def _kmeans_pp(x: np.ndarray, weights: Optional[np.ndarray], k: int, g: torch.Generator) -> np.ndarray:
    """Weighted k-means++ seeds (Arthur & Vassilvitskii, 2007): each next seed drawn with
    probability ∝ weight × squared distance to the nearest seed so far.

    Each seed's distances are one matrix-vector product (``|x|^2 - 2 x.c + |c|^2`` in float64):
    the seeds drawn are those of the direct ``((x - c)^2).sum(1)`` (tested), 7-10x faster (for
    1,024 seeds on 65,536 rows of dim 64, 61 s became about 6 s on one core)."""
    pts = torch.from_numpy(x).double()
    w = torch.ones(pts.shape[0], dtype=torch.float64) if weights is None else torch.from_numpy(weights).double()
    sq = (pts * pts).sum(1)

    def distances_to(i: int) -> torch.Tensor:
        d = torch.addmv(sq, pts, pts[i], alpha=-2.0).add_(sq[i]).clamp_(min=0.0)
        d[i] = 0.0  # (exactly, as the direct difference gives)
        return d

    first = int(torch.multinomial(w / w.sum(), 1, generator=g))
    seeds = [first]
    nearest = distances_to(first)
    for _ in range(1, k):
        mass = w * nearest
        total = float(mass.sum())
        i = int(torch.multinomial(mass / total, 1, generator=g)) if total > 0 else \
            int(torch.randint(pts.shape[0], (1,), generator=g))
        seeds.append(i)
        torch.minimum(nearest, distances_to(i), out=nearest)
    return x[seeds].copy()


def _seeds(x: np.ndarray, weights: Optional[np.ndarray], k: int, g: torch.Generator) -> np.ndarray:
    """k-means++ seeds of the training sample ``x``, drawn from at most :data:`SEED_ROWS` of
    its rows (a random subset, by ``g``, where it has more; the same draws as before where not)."""
    if x.shape[0] > SEED_ROWS:
        part = torch.randperm(x.shape[0], generator=g)[:SEED_ROWS].sort().values.numpy()
        x, weights = x[part], None if weights is None else weights[part]
    return _kmeans_pp(x, weights, k, g)


def assign_rows(weights: torch.Tensor, centroids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> SharedRows:
    """Every row of ``weights`` (of ``rows`` only, sorted indices, when given) assigned its
    nearest of ``centroids``, in chunks.  Raises ``ValueError`` naming the first non-finite row."""
    if rows is None:
        return SharedRows(centroids, *_assign(weights, centroids))
    try:
        index, error = _assign(weights.index_select(0, rows), centroids)
    except ValueError:  # (named by its place among the rows given: name its own)
        _check_finite(_as_float(weights.index_select(0, rows)), 0, rows)
        raise
    return SharedRows(centroids, index, error, rows)


def cluster_rows(weights: torch.Tensor, priority: Optional[torch.Tensor], k: int, seed: int = 0,
                 among: Optional[torch.Tensor] = None, assign_only: Optional[torch.Tensor] = None) -> SharedRows:
    """``k`` centroids of ``weights`` [rows, dim] (any view; read in chunks), weighted by
    ``priority`` [rows] (``None`` or all zero: equal weights), stored FP16; every row is then
    assigned its nearest.

    ``among`` (bool [rows]): train the centroids on those rows only (by their priorities; equal
    weights where theirs are all zero), e.g. the rows a budget put in the SHARED tier, which
    are the only ones that read them; ``k`` is then at most their number.

    ``assign_only`` (sorted row indices): assign those rows only (the result's ``rows``), e.g.
    to measure a candidate ``K`` on a sample of a large table.

    ``k = 1`` is the weighted mean row (exact); larger ``k`` a faiss k-means on a seeded sample.
    Raises ``ValueError`` on a non-finite row (naming it)."""
    n, dim = weights.shape
    if n == 0:
        return SharedRows(torch.zeros(0, dim), torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.float32))
    p = None if priority is None else priority.double().reshape(-1)
    if among is not None:
        among = among.reshape(-1).bool()
        if among.numel() != n or not bool(among.any()):
            raise ValueError(f"cluster_rows: among must mark some of the {n} rows")
        if p is None or not float(p[among].sum()) > 0:
            p = among.double()
        else:
            p = torch.where(among, p, torch.zeros((), dtype=p.dtype))
        n_train = int(among.sum())
    else:
        n_train = n
    k = max(1, min(int(k), n_train))
    if p is not None and not float(p.sum()) > 0:
        p = None
    if k == 1:
        # (a float64 matrix-vector product per cache-sized chunk: 16x faster than the weighted
        # column sums of 65,536-row chunks, 5.4 s per GiB of rows, the same to ~1e-15)
        total = torch.zeros(dim, dtype=torch.float64)
        ones = torch.ones(MEAN_ROWS, dtype=torch.float64)
        buf = torch.empty(MEAN_ROWS, dim, dtype=torch.float64)  # (one buffer: a fresh 2 MB each
        # chunk was mapped and faulted in anew, 3x the product's time)
        for r0 in range(0, n, MEAN_ROWS):
            chunk = weights[r0:r0 + MEAN_ROWS].detach()
            w = buf[:chunk.shape[0]].copy_(chunk)
            total += torch.mv(w.t(), p[r0:r0 + w.shape[0]] if p is not None else ones[:w.shape[0]])
        if not bool(torch.isfinite(total).all()):  # (finite rows' sums are; a NaN or Inf carries)
            for r0 in range(0, n, CHUNK_ROWS):
                _check_finite(_as_float(weights[r0:r0 + CHUNK_ROWS]), r0)
        mean = total / (float(p.sum()) if p is not None else n)
        centroids = mean.float().unsqueeze(0)
    else:
        import faiss  # (a dependency of the SHARED tier only)

        g = torch.Generator().manual_seed(seed)
        take = min(n_train, SAMPLE_PER_CENTROID * k)
        if among is not None:  # (a sample of those rows only)
            pool = among.nonzero().reshape(-1)
            rows = pool[torch.randperm(n_train, generator=g)[:take]].sort().values
        else:
            rows = torch.randperm(n, generator=g)[:take].sort().values if take < n else torch.arange(n)
        x = _as_float(weights.index_select(0, rows) if take < n else weights).contiguous().numpy()
        if not np.isfinite(x).all():  # (the first such row of all, not only of the sample)
            for r0 in range(0, n, CHUNK_ROWS):
                _check_finite(_as_float(weights[r0:r0 + CHUNK_ROWS]), r0)
        km = faiss.Kmeans(dim, k, niter=ITERATIONS, seed=seed, verbose=False,
                          max_points_per_centroid=SAMPLE_PER_CENTROID, min_points_per_centroid=1)
        # faiss takes weights per training point; a tiny floor keeps unseen rows in the sample
        # from being ignored entirely (all-zero weights would leave centroids undefined).
        w = None if p is None else (p[rows].numpy() + 1e-12).astype(np.float32)
        # faiss seeds with random rows, which on well-separated clusters often leaves two seeds
        # in one cluster and none in another, for good; k-means++ seeds do not.
        km.train(x, weights=w, init_centroids=_seeds(x, w, k, g))
        centroids = torch.from_numpy(km.centroids.copy())
    centroids = centroids.half().float()  # as stored: FP16
    return assign_rows(weights, centroids, assign_only)
