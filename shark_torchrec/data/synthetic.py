"""Synthetic click data with a planted ground truth: the project's built-in default data.

Every sparse field draws its ids from a truncated power law over its cardinality: rank
``k`` (0-based) has probability proportional to the mass of ``x^-s`` on ``[k+1, k+2)`` within
``[1, n+1)``, i.e. a Zipf law with exponent ``s`` sampled by inverting its continuous CDF (no
per-id table, so cardinalities can be huge; the head is a little flatter than the discrete
law's).  Ids are then scattered over ``[0, cardinality)`` by a fixed affine bijection, so popular ids
are not simply the small ones, as in hashed real logs).  Multi-hot fields draw a bag length
per example uniformly from ``[min_hot, max_hot]``.

The label is planted: only the fields listed in ``informative`` drive it.  Each informative
field ``f`` has a hidden effect per id, ``w_f(id) ~ N(0, 1)``, computed by hashing the id (no
table is stored, so cardinalities can be in the billions).  The logit of an example is

    logit = bias + signal * sum_{f informative} mean_{id in bag_f} w_f(id)

and ``label ~ Bernoulli(sigmoid(logit))``.  Dense features are standard normal noise.  The
remaining sparse fields are pure noise, so a field-importance method should rank every
informative field above every noise field.

Global batch ``g`` is generated from a generator seeded by ``(seed, g)``: the stream is
deterministic given the seed and independent of world size, rank and data-loader workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from shark_torchrec.data.batching import check_rank, local_slice, make_batch, worker_shard

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a cheap, well-mixed, stateless hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hashed_normal(ids: np.ndarray, salt: int) -> np.ndarray:
    """A standard-normal value per id, a pure function of ``(id, salt)`` (Box-Muller)."""
    ids = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        h1 = _splitmix64(ids ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
        h2 = _splitmix64(h1 ^ np.uint64(0xD1B54A32D192ED03))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class SyntheticField:
    """One sparse field of the synthetic data.

    Attributes:
        name: feature name (the ``KeyedJaggedTensor`` key).
        cardinality: ids are in ``[0, cardinality)``.
        zipf_exponent: ``s`` of the truncated power law of the ids (0 = uniform).
        min_hot, max_hot: ids per example, uniform in ``[min_hot, max_hot]`` (1, 1 = one-hot).
    """

    name: str
    cardinality: int
    zipf_exponent: float = 1.05
    min_hot: int = 1
    max_hot: int = 1

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise ValueError(f"SyntheticField {self.name!r}: cardinality must be >= 1")
        if self.zipf_exponent < 0:
            raise ValueError(f"SyntheticField {self.name!r}: zipf_exponent must be >= 0")
        if not 0 <= self.min_hot <= self.max_hot or self.max_hot < 1:
            raise ValueError(
                f"SyntheticField {self.name!r}: need 0 <= min_hot <= max_hot and max_hot >= 1, "
                f"got {self.min_hot}, {self.max_hot}"
            )


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic click-data generator's settings.

    Attributes:
        fields: the sparse fields.
        informative: names of the fields that drive the label (the planted ground truth).
        num_dense: number of dense (noise) features.
        signal: scale of the planted effects on the logit.
        bias: logit offset (sets the positive rate).
        seed: everything is a function of this seed.
    """

    fields: Sequence[SyntheticField]
    informative: Sequence[str]
    num_dense: int = 13
    signal: float = 1.5
    bias: float = -1.0
    seed: int = 0

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"SyntheticConfig: duplicate field names in {names}")
        unknown = sorted(set(self.informative) - set(names))
        if unknown:
            raise ValueError(f"SyntheticConfig.informative names unknown fields: {unknown}")
        if self.num_dense < 0:
            raise ValueError("SyntheticConfig.num_dense must be >= 0")

    @property
    def feature_names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return [f.cardinality for f in self.fields]

    @property
    def noise_fields(self) -> List[str]:
        return [f.name for f in self.fields if f.name not in set(self.informative)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def default(
        num_fields: int = 26,
        num_informative: int = 6,
        cardinality: "int | Sequence[int]" = 10_000,
        multi_hot_fields: int = 2,
        max_hot: int = 5,
        seed: int = 0,
        **kwargs,
    ) -> "SyntheticConfig":
        """A Criteo-like default: ``num_fields`` fields named ``cat_0..``, the first
        ``num_informative`` of them informative, the last ``multi_hot_fields`` multi-hot."""
        cards = [cardinality] * num_fields if isinstance(cardinality, int) else list(cardinality)
        if len(cards) != num_fields:
            raise ValueError(f"{len(cards)} cardinalities for {num_fields} fields")
        fields = [
            SyntheticField(
                name=f"cat_{i}",
                cardinality=cards[i],
                max_hot=max_hot if i >= num_fields - multi_hot_fields else 1,
            )
            for i in range(num_fields)
        ]
        return SyntheticConfig(
            fields=fields,
            informative=[f"cat_{i}" for i in range(num_informative)],
            seed=seed,
            **kwargs,
        )


def _truncated_zipf(rng: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """Ranks in ``[0, n)``: ``floor(x) - 1`` for ``x`` drawn from density ``∝ x^-s`` on
    ``[1, n + 1)`` by inverting its CDF."""
    u = rng.random(size)
    if s == 0 or n == 1:
        return np.minimum((u * n).astype(np.int64), n - 1)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        a = 1.0 - s
        x = (u * ((n + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def _scatter(ranks: np.ndarray, n: int, salt: int) -> np.ndarray:
    """A fixed bijection of ``[0, n)``: ``(a * r + b) mod n`` with ``gcd(a, n) = 1``."""
    a = 1 + 2 * (salt % 1_000_003)
    while np.gcd(a, n) != 1:
        a += 2 if n % 2 == 0 else 1
    b = (salt * 7919) % n
    return (ranks.astype(object) * a + b) % n if n > (1 << 31) else (ranks * a + b) % n


class SyntheticClickDataset(IterableDataset):
    """Generated click data with planted informative fields, as TorchRec ``Batch`` objects.

    Args:
        config: the generator settings.
        batch_size: examples per batch per rank.
        num_batches: number of global batches in one pass.
        rank, world_size: this process's slice of every global batch.
        start_batch: skip the first global batches (resuming).
        batch_offset: generate global batches ``batch_offset + g`` (a held-out split is the
            same generator with a different offset).
        id_dtype: ``torch.int64`` or ``torch.int32``.
    """

    def __init__(
        self,
        config: SyntheticConfig,
        batch_size: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        batch_offset: int = 0,
        id_dtype: torch.dtype = torch.int64,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        if batch_size < 1 or num_batches < 0:
            raise ValueError("SyntheticClickDataset: batch_size >= 1 and num_batches >= 0 needed")
        self.config = config
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.batch_offset = batch_offset
        self.id_dtype = id_dtype
        self.keys = config.feature_names

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def global_batch(self, g: int) -> Batch:
        """Global batch ``g`` (all ranks' examples), e.g. for single-process references."""
        return self._generate(g, 0, self.batch_size * self.world_size)

    def _generate(self, g: int, start: int, end: int) -> Batch:
        cfg = self.config
        n = self.batch_size * self.world_size
        rng = np.random.default_rng([cfg.seed, self.batch_offset + g])
        dense = rng.standard_normal((n, cfg.num_dense), dtype=np.float32)
        logit = np.full(n, cfg.bias, dtype=np.float64)
        informative = set(cfg.informative)
        lengths, values = [], []
        for k, f in enumerate(cfg.fields):
            lens = rng.integers(f.min_hot, f.max_hot + 1, size=n)
            ranks = _truncated_zipf(rng, f.cardinality, int(lens.sum()), f.zipf_exponent)
            ids = np.asarray(_scatter(ranks, f.cardinality, cfg.seed * 131 + k), dtype=np.int64)
            if f.name in informative:
                effect = hashed_normal(ids, salt=(cfg.seed << 20) ^ (k + 1))
                bag = np.repeat(np.arange(n), lens)
                sums = np.bincount(bag, weights=effect, minlength=n)
                logit += cfg.signal * sums / np.maximum(lens, 1)
            offsets = np.concatenate([[0], np.cumsum(lens)])
            lengths.append(lens[start:end].astype(np.int64))
            values.append(ids[offsets[start] : offsets[end]])
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return make_batch(
            dense[start:end], labels[start:end], self.keys, lengths, values, self.id_dtype
        )

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = worker_shard()
        start, end = local_slice(self.batch_size * self.world_size, self.rank, self.world_size)
        for g in range(self.start_batch, self.num_batches):
            # Counted from start_batch: the DataLoader asks worker 0 first.
            if (g - self.start_batch) % num_workers == worker:
                yield self._generate(g, start, end)
