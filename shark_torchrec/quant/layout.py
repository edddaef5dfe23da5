"""The tier layout of a mixed collection: which logical tables it holds, how many rows of each
sit in each tier, how tables are grouped (one FBGEMM TBE per group), and the physical
sub-tables (``"<table>@<tier>"``) that layout gives each group's TBE.

:class:`MixedLayout` is also what a saved collection carries to be rebuilt without its float
model (:meth:`MixedLayout.to_dict` / :meth:`MixedLayout.from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from shark_torchrec.quant.id_map import check_width, entry_bits
from shark_torchrec.quant.rows import DATA_TYPE
from shark_torchrec.quant.tiers import TIER_ORDER, Tier

#: v2: bit-packed id maps (``map_bits``).  Code that reads only v1 would take a v2 layout's
#: maps for 4-byte entries and read wrong rows, so v2 is a new name; v1 layouts still load.
LAYOUT_FORMAT = "shark-torchrec/rowwise-mixed-ebc/v2"
_READABLE_FORMATS = (LAYOUT_FORMAT, "shark-torchrec/rowwise-mixed-ebc/v1")
#: Row alignments a layout may use (powers of two FBGEMM's TBE accepts; CUDA needs 16).
ROW_ALIGNMENTS = (1, 2, 4, 8, 16)


def serving_row_alignment(device_type: str, choice: str = "auto") -> int:
    """The row alignment a ``--row_alignment`` ``choice`` means for tables served on
    ``device_type``: a number as given; ``auto`` is 16 on CUDA (FBGEMM's CUDA kernels need it)
    and 1 elsewhere — the rule TorchRec's sharded quantized kernels follow
    (``torchrec/distributed/quant_embedding_kernel.py``)."""
    if choice != "auto":
        return int(choice)
    return 16 if device_type == "cuda" else 1


#: the pooled embeddings' dtypes a collection can return (TorchRec's ``output_dtype``)
OUTPUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def output_dtype_name(dtype) -> str:
    """``"fp32"`` / ``"fp16"`` for a name or a ``torch.dtype`` (``torch.float``, ``torch.half``)."""
    for name, d in OUTPUT_DTYPES.items():
        if dtype == name or dtype == d:
            return name
    raise ValueError(f"output_dtype must be fp32 or fp16 (torch.float32 or torch.float16), got {dtype!r}")


def reported_data_type(stored: List[Tier]) -> DataType:
    """The ``data_type`` a mixed table reports, from the tiers that hold its rows: its one tier's
    when it has one; for a mixed table the most precise one's (its widest rows: what a planner
    sizing it by ``data_type`` must assume, an upper bound); ``INT2`` for a table all of whose
    rows are dropped (it holds none)."""
    for tier in TIER_ORDER:
        if tier in stored and tier in DATA_TYPE:
            return DATA_TYPE[tier]
    return DataType.INT2


def _saved_map_bits(d: Dict) -> Dict[str, int]:
    """A saved layout's id-map widths in bits: ``map_bits``; or, written before entries were
    bit-packed, ``map_bytes`` (whole-byte entries: the same bytes as 8x bits); or, before the
    width was stored, 4-byte entries."""
    if d.get("map_bits"):
        return dict(d["map_bits"])
    return {name: 8 * int(w) for name, w in (d.get("map_bytes") or {t["name"]: 4 for t in d["tables"]}).items()}


@dataclasses.dataclass
class MixedLayout:
    """What a mixed collection holds, without weights (serialisable; enough to rebuild it).

    Attributes:
        tables: the logical tables (name, rows, dim, features, pooling).
        tiers: the tiers with rows, most precise first (DROP last if used; never SHARED,
            whose rows have none of their own).
        rows: ``{table: [renumbered rows per tier in tiers order]}``: the table's rows in each
            tier, plus, in FP16, its centroids (:attr:`shared`).
        shared: ``{table: [SHARED rows, centroids]}`` for tables with SHARED rows: their id-map
            entries point at the centroids, stored after the table's own FP16 rows.
        map_bits: ``{table: bits per id-map entry}`` (:mod:`~shark_torchrec.quant.id_map`):
            by default what the table's rows need; a shard keeps its whole table's width, so
            the bytes do not depend on the placement.  Layouts written before entries were
            bit-packed give ``map_bytes`` (read as 8x bits: the same bytes), and before that
            nothing (4-byte entries).
        is_weighted: whether inputs carry per-id weights.
        groups: tables split into groups, each its own TBE.
        row_alignment: bytes each stored row is padded to (FBGEMM's layout): 16, which FBGEMM's
            CUDA kernels need and TorchRec's quantized collection uses everywhere, or less for
            tables served on CPU only (1: FBGEMM's own CPU default; a 64-dim INT4 row then
            takes 36 bytes instead of 48, an INT2 row 20 instead of 32).
        embedding_names: ``{table: [output key of each of its features]}``, TorchRec's rule
            (``get_embedding_names_by_table``): the feature's name, or ``"<feature>@<table>"``
            for a feature several tables of the whole collection read.  Computed from
            ``tables`` when not given; a group's layout (:meth:`subset`) keeps the whole
            collection's names.
    """

    tables: List[Dict]
    tiers: List[str]
    rows: Dict[str, List[int]]
    is_weighted: bool = False
    groups: List[List[str]] = dataclasses.field(default_factory=list)
    row_alignment: int = 16
    embedding_names: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    shared: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    output_dtype: str = "fp32"
    map_bits: Dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.groups:  # one group of every table
            self.groups = [[t["name"] for t in self.tables]]
        self.map_bits = {t["name"]: self.map_bits.get(t["name"], entry_bits(t["rows"])) for t in self.tables}
        for t in self.tables:
            check_width(t["name"], t["rows"], self.map_bits[t["name"]], sum(self.rows.get(t["name"], [])))
        if not self.embedding_names:
            names = get_embedding_names_by_table(self.configs())
            self.embedding_names = {t["name"]: n for t, n in zip(self.tables, names)}
        if self.row_alignment not in ROW_ALIGNMENTS:
            raise ValueError(f"row_alignment must be one of {ROW_ALIGNMENTS}, got {self.row_alignment!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.output_dtype!r}")

    def to_dict(self) -> Dict:
        return {"format": LAYOUT_FORMAT, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: Dict) -> "MixedLayout":
        if not isinstance(d, dict) or d.get("format") not in _READABLE_FORMATS:
            raise ValueError(f"not a row-wise mixed collection layout (format {LAYOUT_FORMAT!r})")
        return MixedLayout(tables=d["tables"], tiers=d["tiers"], rows=d["rows"],
                           is_weighted=d["is_weighted"], groups=d.get("groups") or [],
                           row_alignment=d.get("row_alignment", 16),  # (16 before it was stored)
                           embedding_names=d.get("embedding_names") or {},
                           shared={k: list(v) for k, v in (d.get("shared") or {}).items()},
                           output_dtype=d.get("output_dtype", "fp32"),
                           map_bits=_saved_map_bits(d))

    def stored_tiers(self, table: str) -> List[Tier]:
        """The tiers holding rows of ``table`` (FP16 also when it holds only the centroids of
        SHARED rows), most precise first."""
        return [Tier.parse(t) for t, n in zip(self.tiers, self.rows[table]) if n > 0]

    def reported_configs(self) -> List[EmbeddingBagConfig]:
        """:meth:`configs` with each table's ``data_type``: what the collection reports
        (:func:`reported_data_type`)."""
        return [dataclasses.replace(c, data_type=reported_data_type(self.stored_tiers(c.name)))
                for c in self.configs()]

    def configs(self) -> List[EmbeddingBagConfig]:
        return [EmbeddingBagConfig(name=t["name"], num_embeddings=t["rows"], embedding_dim=t["dim"],
                                   feature_names=list(t["features"]),
                                   pooling=PoolingType(t["pooling"])) for t in self.tables]

    def slots(self) -> List[tuple]:
        """``(embedding name, input feature, table config)`` of every output slot, in output
        order: a table's features in its order, tables in theirs.  A feature read by several
        tables has one slot per table."""
        return [(e, f, c) for c in self.configs()
                for e, f in zip(self.embedding_names[c.name], c.feature_names)]

    def check(self) -> None:
        """Raise naming the table whose rows per tier do not add up to its rows."""
        K = len(self.tiers)
        if Tier.SHARED.value in self.tiers:
            raise ValueError("layout tiers list the tiers with rows of their own: not 'shared'")
        for t in self.tables:
            counts = self.rows[t["name"]]
            shared, centroids = self.shared.get(t["name"], (0, 0))
            if shared and Tier.FP16.value not in self.tiers:
                raise ValueError(f"table {t['name']!r}: SHARED rows without an fp16 tier for their centroids")
            if len(counts) != K or sum(counts) != t["rows"] - shared + centroids or min(counts, default=0) < 0:
                raise ValueError(f"table {t['name']!r}: rows per tier {counts} do not add up to "
                                 f"{t['rows']} rows ({shared} of them shared, {centroids} centroids) "
                                 f"over tiers {self.tiers}")

    def physical_configs(self) -> List[EmbeddingBagConfig]:
        """The TBE tables of this layout: one per (tier, table) with rows, tier-major — the
        order the id-to-tier step emits buckets in, so a TBE reads them without a permute and
        its output is ``[tier][feature]`` blocks.  DROP has none (its rows read as zeros)."""
        out = []
        for k, tier in enumerate(Tier.parse(t) for t in self.tiers):
            for c in self.configs():
                if tier is not Tier.DROP and self.rows[c.name][k] > 0:
                    out.append(EmbeddingBagConfig(
                        name=f"{c.name}@{tier.value}", num_embeddings=self.rows[c.name][k],
                        embedding_dim=c.embedding_dim,
                        feature_names=[f"{e}@{tier.value}" for e in self.embedding_names[c.name]],
                        pooling=PoolingType.SUM, data_type=DATA_TYPE[tier]))
        return out

    def subset(self, names: Sequence[str]) -> "MixedLayout":
        """The layout of some tables (one group of them)."""
        keep = set(names)
        return MixedLayout(tables=[t for t in self.tables if t["name"] in keep], tiers=list(self.tiers),
                           rows={n: r for n, r in self.rows.items() if n in keep},
                           is_weighted=self.is_weighted, groups=[list(names)],
                           row_alignment=self.row_alignment,
                           embedding_names={n: e for n, e in self.embedding_names.items() if n in keep},
                           shared={n: s for n, s in self.shared.items() if n in keep},
                           output_dtype=self.output_dtype,
                           map_bits={n: w for n, w in self.map_bits.items() if n in keep})
