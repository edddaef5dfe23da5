"""Synthetic click data with a planted ground truth: the project's built-in default data.

Every sparse field draws its ids from a truncated power law over its cardinality: rank
``k`` (0-based) has probability proportional to the mass of ``x^-s`` on ``[k+1, k+2)`` within
``[1, n+1)``, i.e. a Zipf law with exponent ``s`` sampled by inverting its continuous CDF (no
per-id table, so cardinalities can be huge; the head is a little flatter than the discrete
law's).  Ids are then scattered over ``[0, cardinality)`` by a fixed affine bijection, so popular ids
are not simply the small ones, as in hashed real logs).  Multi-hot fields draw a bag length
per example uniformly from ``[min_hot, max_hot]``.

The label is planted: only the fields listed in ``informative`` drive it.  Each field ``f``
has a weight ``a_f`` (1 for informative fields unless ``field_weights`` says otherwise, 0 for
the rest) and a hidden effect per id, ``w_f(id) ~ N(0, 1)`` on the fraction
``active_fraction`` of its ids and 0 on the others (row-level effects concentrated in a subset
of rows), computed by hashing the id (no table is stored, so cardinalities can be in the
billions).  The logit of an example is

    logit = bias + Σ_k d_k x_k
            + signal · Σ_f a_f · mean_{id in bag_f} w_f(id)
            + Σ_{(i, j, s) in interactions} s · mean_{bag_i} h_i(id) · mean_{bag_j} h_j(id)

with ``x`` the dense features (standard normal; ``dense_weights`` ``d``, default none) and
``h`` a second hashed normal per id (pairwise interactions, rank one: what a DLRM's dot
interaction can learn), and ``label ~ Bernoulli(sigmoid(logit))``.  The remaining sparse fields
are pure noise, so a field-importance method should rank every informative field above every
noise field.  A field with ``mode_probability`` ``m`` takes its most popular id with
probability ``m`` and a Zipf draw otherwise: ``m = 1`` is a constant field, ``m`` near 1 a
near-constant one (both carry no information when they are not informative).

The ground truth is known exactly: :meth:`SyntheticConfig.true_field_importance` gives each
field's permutation importance under the true logit (the expected log-loss increase when the
field's bags are shuffled across examples), :meth:`SyntheticConfig.true_row_importance` each
row's expected squared contribution to the logit.  :meth:`SyntheticConfig.criteo` is a
Criteo-shaped benchmark layout: 26 fields with the Criteo Kaggle vocabulary sizes (capped),
13 dense fields, strong/medium/weak/zero field weights, interactions, constant and
near-constant fields.

Global batch ``g`` is generated from a generator seeded by ``(seed, g)``: the stream is
deterministic given the seed and independent of world size, rank and data-loader workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from shark_torchrec.data.batching import check_id_dtype, check_rank, local_slice, make_batch, worker_shard

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
        mode_probability: probability that an id is the field's most popular one instead of
            a Zipf draw (1: a constant field; near 1: a near-constant one).
        active_fraction: fraction of the ids that carry a planted effect (chosen by hashing
            the id); the others have none.
    """

    name: str
    cardinality: int
    zipf_exponent: float = 1.05
    min_hot: int = 1
    max_hot: int = 1
    mode_probability: float = 0.0
    active_fraction: float = 1.0

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
        if not 0.0 <= self.mode_probability <= 1.0:
            raise ValueError(f"SyntheticField {self.name!r}: mode_probability must be in [0, 1]")
        if not 0.0 < self.active_fraction <= 1.0:
            raise ValueError(f"SyntheticField {self.name!r}: active_fraction must be in (0, 1]")

    def id_probabilities(self) -> np.ndarray:
        """``P(id)`` of one draw, for every id in ``[0, cardinality)`` (float64)."""
        n, s = self.cardinality, self.zipf_exponent
        k = np.arange(n, dtype=np.float64)
        if s == 0 or n == 1:
            p_rank = np.full(n, 1.0 / n)
        elif abs(s - 1.0) < 1e-9:
            p_rank = (np.log(k + 2) - np.log(k + 1)) / np.log(n + 1.0)
        else:
            a = 1.0 - s
            p_rank = ((k + 2) ** a - (k + 1) ** a) / ((n + 1.0) ** a - 1.0)
        p_rank = (1.0 - self.mode_probability) * p_rank
        p_rank[0] += self.mode_probability
        return p_rank  # indexed by rank; the caller scatters ranks to ids


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
        field_weights: per-field weights ``a_f`` of the planted effects (fields not named:
            1 if informative, else 0).
        interactions: ``(field_i, field_j, strength)`` pairwise effects.
        dense_weights: linear effects of the first ``len(dense_weights)`` dense features.
    """

    fields: Sequence[SyntheticField]
    informative: Sequence[str]
    num_dense: int = 13
    signal: float = 1.5
    bias: float = -1.0
    seed: int = 0
    field_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    interactions: Sequence[Tuple[str, str, float]] = ()
    dense_weights: Sequence[float] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"SyntheticConfig: duplicate field names in {names}")
        unknown = sorted(set(self.informative) - set(names))
        if unknown:
            raise ValueError(f"SyntheticConfig.informative names unknown fields: {unknown}")
        if self.num_dense < 0:
            raise ValueError("SyntheticConfig.num_dense must be >= 0")
        unknown = sorted(set(self.field_weights) - set(names))
        if unknown:
            raise ValueError(f"SyntheticConfig.field_weights names unknown fields: {unknown}")
        for i, (a, b, _) in enumerate(self.interactions):
            bad = sorted({a, b} - set(names))
            if bad or a == b:
                raise ValueError(f"SyntheticConfig.interactions[{i}]: ({a!r}, {b!r}) must name two "
                                 f"different known fields")
        driving = {f for f, w in self.field_weights.items() if w != 0}
        driving |= {f for a, b, s in self.interactions if s != 0 for f in (a, b)}
        unlisted = sorted(driving - set(self.informative))
        if unlisted:
            raise ValueError(f"SyntheticConfig: fields {unlisted} drive the label but are not "
                             f"listed in informative")
        if len(self.dense_weights) > self.num_dense:
            raise ValueError(f"SyntheticConfig.dense_weights has {len(self.dense_weights)} values "
                             f"for {self.num_dense} dense features")

    def weight(self, name: str) -> float:
        """The weight ``a_f`` of a field's planted effect."""
        return float(self.field_weights.get(name, 1.0 if name in self.informative else 0.0))

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


#: Criteo Kaggle vocabulary sizes per categorical field (the list TorchRec's DLRM example uses).
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]

#: The Criteo-shaped benchmark's planted layout: field -> weight of its own effect.
CRITEO_LAYOUT_WEIGHTS = {
    # strong                medium                  weak
    "cat_0": 1.0, "cat_2": 1.0, "cat_6": 1.0, "cat_9": 1.0,
    "cat_3": 0.6, "cat_11": 0.6, "cat_14": 0.6, "cat_23": 0.6,
    "cat_1": 0.3, "cat_4": 0.3, "cat_12": 0.3, "cat_25": 0.3,
}
#: Pairwise interactions; cat_17 and cat_18 act only through them.
CRITEO_LAYOUT_INTERACTIONS = (("cat_0", "cat_6", 0.5), ("cat_9", "cat_18", 0.5),
                              ("cat_4", "cat_17", 0.4))
#: Constant fields (one value in every row) and near-constant ones (mode probability).
CRITEO_LAYOUT_MODES = {"cat_8": 1.0, "cat_19": 1.0, "cat_16": 0.995, "cat_21": 0.99}


def criteo_config(
    seed: int = 0, max_rows: int = 1_000_000, signal: float = 0.6, bias: float = -1.4,
    active_fraction: float = 0.2,
) -> SyntheticConfig:
    """The Criteo-shaped benchmark: 26 one-hot fields ``cat_0..cat_25`` with the Criteo Kaggle
    vocabulary sizes (capped at ``max_rows``), Zipf(1.05) ids, 13 dense fields of which the
    first four carry linear effects, and the planted layout above: 12 fields with weights
    1 / 0.6 / 0.3, two more acting only through pairwise interactions, two constant and two
    near-constant fields, eight noise fields.  In fields of 10,000 rows or more only
    ``active_fraction`` of the ids carry an effect."""
    fields = []
    for i, card in enumerate(CRITEO_KAGGLE_CARDINALITIES):
        name = f"cat_{i}"
        card = min(card, max_rows)
        fields.append(SyntheticField(
            name=name, cardinality=card, mode_probability=CRITEO_LAYOUT_MODES.get(name, 0.0),
            active_fraction=active_fraction if card >= 10_000 else 1.0))
    informative = sorted(set(CRITEO_LAYOUT_WEIGHTS) | {f for a, b, _ in CRITEO_LAYOUT_INTERACTIONS
                                                       for f in (a, b)},
                         key=lambda f: int(f.split("_")[1]))
    weights = {f: CRITEO_LAYOUT_WEIGHTS.get(f, 0.0) for f in informative}
    return SyntheticConfig(fields=fields, informative=informative, num_dense=13, signal=signal,
                           bias=bias, seed=seed, field_weights=weights,
                           interactions=CRITEO_LAYOUT_INTERACTIONS,
                           dense_weights=(0.4, 0.3, 0.2, 0.1))


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


def _hashed_uniform(ids: np.ndarray, salt: int) -> np.ndarray:
    """A uniform [0, 1) value per id, a pure function of ``(id, salt)``."""
    with np.errstate(over="ignore"):
        h = _splitmix64(ids.astype(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _field_salts(cfg: SyntheticConfig, k: int) -> Tuple[int, int, int]:
    """Salts of field ``k``'s effect, active-row choice and interaction factor."""
    effect = (cfg.seed << 20) ^ (k + 1)  # the original generator's salt: streams unchanged
    return effect, effect ^ 0x5A5A_0000_0000, effect ^ 0x3C3C_0000_0000


def _row_effects(cfg: SyntheticConfig, k: int, ids: np.ndarray) -> np.ndarray:
    """``w_f(id)``: the planted effect of each id (0 on inactive ids)."""
    f = cfg.fields[k]
    effect_salt, active_salt, _ = _field_salts(cfg, k)
    w = hashed_normal(ids, salt=effect_salt)
    if f.active_fraction < 1.0:
        w = np.where(_hashed_uniform(ids, active_salt) < f.active_fraction, w, 0.0)
    return w


def _interaction_factors(cfg: SyntheticConfig, k: int, ids: np.ndarray) -> np.ndarray:
    return hashed_normal(ids, salt=_field_salts(cfg, k)[2])


class _Components:
    """Per-example parts of the true logit of one global batch: the dense term, each field's
    own term and each interacting field's factor (so a field can be permuted on its own)."""

    def __init__(self, cfg: SyntheticConfig, n: int, dense: np.ndarray) -> None:
        self.cfg = cfg
        d = np.asarray(cfg.dense_weights, dtype=np.float64)
        self.base = np.full(n, cfg.bias, dtype=np.float64)
        if len(d):
            self.base += dense[:, : len(d)].astype(np.float64) @ d
        self.own: Dict[str, np.ndarray] = {}
        self.factor: Dict[str, np.ndarray] = {}

    def add_field(self, k: int, ids: np.ndarray, lens: np.ndarray) -> None:
        cfg, f = self.cfg, self.cfg.fields[k]
        n = lens.shape[0]
        bag = np.repeat(np.arange(n), lens)
        a = cfg.weight(f.name)
        if a != 0:
            sums = np.bincount(bag, weights=_row_effects(cfg, k, ids), minlength=n)
            self.own[f.name] = cfg.signal * (a * sums) / np.maximum(lens, 1)
        if any(f.name in (i, j) for i, j, _ in cfg.interactions):
            sums = np.bincount(bag, weights=_interaction_factors(cfg, k, ids), minlength=n)
            self.factor[f.name] = sums / np.maximum(lens, 1)

    def logit(self, permuted: Optional[str] = None, perm: Optional[np.ndarray] = None) -> np.ndarray:
        """The true logit; with ``permuted``, that field's bags shuffled by ``perm``."""
        def part(table: Dict[str, np.ndarray], name: str) -> np.ndarray:
            v = table[name]
            return v[perm] if name == permuted else v

        out = self.base.copy()
        for name in self.own:
            out = out + part(self.own, name)
        for i, j, strength in self.cfg.interactions:
            out = out + strength * part(self.factor, i) * part(self.factor, j)
        return out


def _sample(cfg: SyntheticConfig, batch_index: int, n: int):
    """Global batch ``batch_index`` of ``n`` examples: dense features, every field's bag
    lengths and ids, and the logit's components (whose ``label_rng`` draws the labels next)."""
    rng = np.random.default_rng([cfg.seed, batch_index])
    dense = rng.standard_normal((n, cfg.num_dense), dtype=np.float32)
    parts = _Components(cfg, n, dense)
    lengths, values = [], []
    for k, f in enumerate(cfg.fields):
        lens = rng.integers(f.min_hot, f.max_hot + 1, size=n)
        total = int(lens.sum())
        ranks = _truncated_zipf(rng, f.cardinality, total, f.zipf_exponent)
        if f.mode_probability > 0:  # drawn only then, so other fields' streams are unchanged
            ranks = np.where(rng.random(total) < f.mode_probability, 0, ranks)
        ids = np.asarray(_scatter(ranks, f.cardinality, cfg.seed * 131 + k), dtype=np.int64)
        parts.add_field(k, ids, lens)
        lengths.append(lens)
        values.append(ids)
    parts.label_rng = rng
    return dense, lengths, values, parts


def true_field_importance(cfg: SyntheticConfig, num_examples: int = 200_000,
                          batch_index: int = 30_000_000) -> Dict[str, float]:
    """Each field's permutation importance under the true logit: the expected log-loss increase
    (nats per example) of the Bayes predictor when the field's bags are shuffled across
    ``num_examples`` generated examples, ``E[KL(Bernoulli(p) || Bernoulli(p_permuted))]``.
    Exactly 0 for a field that does not drive the label (constant fields included)."""
    _, _, _, parts = _sample(cfg, batch_index, num_examples)
    logit = parts.logit()
    p = 1.0 / (1.0 + np.exp(-logit))
    perm = np.random.default_rng([cfg.seed, batch_index, 1]).permutation(num_examples)

    def log_sigmoid(x: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, -x)

    out = {}
    for f in cfg.feature_names:
        if f not in parts.own and f not in parts.factor:
            out[f] = 0.0
            continue
        q = parts.logit(permuted=f, perm=perm)
        # KL(p || q) for Bernoulli distributions, in logits.
        kl = p * (log_sigmoid(logit) - log_sigmoid(q)) + (1 - p) * (log_sigmoid(-logit) - log_sigmoid(-q))
        out[f] = float(kl.mean())
    return out


def _id_law(cfg: SyntheticConfig, k: int):
    """``(P(id), bag lengths)`` of field ``k``: each id's probability of one draw (indexed by id)
    and the lengths its bags take, each alike likely."""
    f = cfg.fields[k]
    ids = np.asarray(_scatter(np.arange(f.cardinality), f.cardinality, cfg.seed * 131 + k), dtype=np.int64)
    p = np.zeros(f.cardinality)
    p[ids] = f.id_probabilities()
    return p, np.arange(f.min_hot, f.max_hot + 1)


def _factor_moments(cfg: SyntheticConfig, k: int) -> Tuple[float, float]:
    """``(E[f], E[f²])`` of field ``k``'s interaction factor in an example: the mean of ``h(id)``
    over its bag (0 for an empty bag), ids drawn independently by their law."""
    p, lens = _id_law(cfg, k)
    h = _interaction_factors(cfg, k, np.arange(cfg.fields[k].cardinality, dtype=np.int64))
    m1, m2 = float((p * h).sum()), float((p * h * h).sum())
    full = lens > 0
    e_f = m1 * float(full.mean())
    e_f2 = float(np.mean(np.where(full, m1 * m1 + (m2 - m1 * m1) / np.maximum(lens, 1), 0.0)))
    return e_f, e_f2


def true_row_importance(cfg: SyntheticConfig, field: str) -> np.ndarray:
    """For every row (id) of ``field``: its expected squared contribution to an example's true
    logit, ``P(id) · E[1/L] · E[(c_own(id) + Σ_pairs s · h(id) · f_partner)²]`` with ``L`` the
    bag length, ``c_own = signal · a_f · w_f(id)`` and ``f_partner`` the partner field's factor
    (its bag's mean of ``h``), whose moments come from the partner's own id law (they are not 0
    and 1: taking them so overstated an interacting field's rows by up to 27%).  0 for rows
    without an effect, so the informative rows are exactly the non-zero ones."""
    k = cfg.feature_names.index(field)
    f = cfg.fields[k]
    p, lens = _id_law(cfg, k)
    inv_len = float(np.mean(np.where(lens > 0, 1.0 / np.maximum(lens, 1), 0.0)))
    all_ids = np.arange(f.cardinality, dtype=np.int64)
    a = cfg.weight(field)
    c = cfg.signal * a * _row_effects(cfg, k, all_ids) if a != 0 else np.zeros(f.cardinality)
    pairs = [(s, _factor_moments(cfg, cfg.feature_names.index(j if field == i else i)))
             for i, j, s in cfg.interactions if field in (i, j)]
    square = c * c
    if pairs:
        h = _interaction_factors(cfg, k, all_ids)
        first = sum(s * e_f for s, (e_f, _) in pairs)  # E[Σ s f]
        # E[(Σ s f)²]: the partners are independent, so only each one's own variance adds
        second = first * first + sum(s * s * (e_f2 - e_f * e_f) for s, (e_f, e_f2) in pairs)
        square = square + 2.0 * c * h * first + h * h * second
    return p * inv_len * square


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
        check_id_dtype(id_dtype, [f.cardinality for f in config.fields], config.feature_names,
                       "SyntheticClickDataset")
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
        dense, lengths, values, parts = _sample(cfg, self.batch_offset + g, n)
        rng_labels = parts.label_rng
        logit = parts.logit()
        labels = (rng_labels.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        local_lengths, local_values = [], []
        for lens, ids in zip(lengths, values):
            offsets = np.concatenate([[0], np.cumsum(lens)])
            local_lengths.append(lens[start:end].astype(np.int64))
            local_values.append(ids[offsets[start] : offsets[end]])
        return make_batch(
            dense[start:end], labels[start:end], self.keys, local_lengths, local_values,
            self.id_dtype,
        )

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = worker_shard()
        start, end = local_slice(self.batch_size * self.world_size, self.rank, self.world_size)
        for g in range(self.start_batch, self.num_batches):
            # Counted from start_batch: the DataLoader asks worker 0 first.
            if (g - self.start_batch) % num_workers == worker:
                yield self._generate(g, start, end)
