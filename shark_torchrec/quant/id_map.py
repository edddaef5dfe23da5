"""The id map of a mixed table: each id's renumbered row, in as few bytes as the table needs.

Every id of a mixed table goes through the id map to its renumbered row (its tier's rows are
contiguous; a SHARED row's entry points at its centroid).  An entry takes the fewest bytes that
hold every renumbered row of the table: 2 bytes for tables of at most 64,512 rows, 3 up to
16,776,192, else 4 (unsigned, little-endian).  The renumbered rows of a table are at most its
rows plus its centroids (at most :data:`MAX_CENTROIDS`, see
:mod:`~shark_torchrec.quant.shared_rows`), so the width depends on the table's rows alone: the
byte budget, the planner and the export count it without knowing the tiers.

A group's map is one ``uint8`` buffer: each table's entries from a byte offset that is a
multiple of 4 (so 2- and 4-byte entries can be read through ``int16``/``int32`` views), and
:data:`TAIL_BYTES` of slack at the end, because the fused CPU kernel reads every entry as a
4-byte load and keeps the bytes it needs (no branch on the width per id).

What it saves: on a 64-dim table whose rows the budget leaves 16 bytes each (93.75% saved), a
4-byte entry is a fifth of what is left; 2 bytes free half of that for the rows.
"""

from __future__ import annotations

import torch

#: The most centroids a table (or shard) takes (:data:`~shark_torchrec.quant.shared_rows.K_CANDIDATES`).
MAX_CENTROIDS = 1024
#: Entry widths, in bytes.
WIDTHS = (2, 3, 4)
#: Slack after a group's last entry: the kernel reads 4 bytes at every entry.
TAIL_BYTES = 4


def entry_bytes(rows: int) -> int:
    """Bytes per id-map entry of a table of ``rows`` rows: the fewest that hold each of its
    renumbered rows (its rows plus up to :data:`MAX_CENTROIDS` centroids)."""
    most = int(rows) + MAX_CENTROIDS
    for w in WIDTHS[:-1]:
        if most <= 1 << (8 * w):
            return w
    return WIDTHS[-1]


def map_bytes(rows: int, width: int) -> int:
    """Bytes the map of a table of ``rows`` rows with ``width``-byte entries takes in its
    group's buffer (rounded up to 4)."""
    return (int(rows) * width + 3) // 4 * 4


def table_map_bytes(rows: int) -> int:
    """:func:`map_bytes` at the width :func:`entry_bytes` gives: what a table's id map costs."""
    return map_bytes(rows, entry_bytes(rows))


def check_width(table: str, rows: int, width: int, renumbered: int) -> None:
    """Raise naming ``table`` if ``width`` is not a valid entry width or cannot hold
    ``renumbered`` rows."""
    if width not in WIDTHS:
        raise ValueError(f"table {table!r}: id-map entries must take one of {WIDTHS} bytes, got {width!r}")
    if renumbered > 1 << (8 * width) or (width == 4 and renumbered > 2**31):
        raise ValueError(f"table {table!r}: {renumbered} renumbered rows ({rows} rows and its centroids) "
                         f"do not fit {width}-byte id-map entries")


def encode(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` (non-negative integers) as ``width``-byte little-endian entries: uint8
    [n * width]."""
    v = values.to(torch.int64).reshape(-1, 1)
    shifts = torch.arange(width, device=v.device, dtype=torch.int64) * 8
    return ((v >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def decode(raw: torch.Tensor, width: int) -> torch.Tensor:
    """The entries of ``raw`` (uint8 [n * width], as :func:`encode` writes them): int64 [n]."""
    b = raw.reshape(-1, width).to(torch.int64)
    shifts = torch.arange(width, device=b.device, dtype=torch.int64) * 8
    return (b << shifts).sum(1)


def gather(raw: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
    """Entries ``ids`` of one table's map ``raw`` (its uint8 slice, starting at a multiple of 4
    bytes): int32.  2- and 4-byte entries are read through a typed view (one gather)."""
    if width == 4:
        return raw.view(torch.int32)[ids]
    if width == 2:
        return raw.view(torch.int16)[ids].to(torch.int32) & 0xFFFF
    at = ids.to(torch.int64) * width
    out = raw[at].to(torch.int32)
    for j in range(1, width):
        out |= raw[at + j].to(torch.int32) << (8 * j)
    return out


def gather_bytes(buffer: torch.Tensor, start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Entries of a whole group's map at byte offsets ``start`` with widths ``width`` (one per
    id; tables of different widths together, as on CUDA, without a host synchronisation): int32.
    Reads up to 3 bytes past an entry, which :data:`TAIL_BYTES` keeps inside the buffer."""
    out = buffer[start].to(torch.int32) | (buffer[start + 1].to(torch.int32) << 8)
    out |= torch.where(width >= 3, buffer[start + 2].to(torch.int32) << 16, 0)
    out |= torch.where(width >= 4, buffer[start + 3].to(torch.int32) << 24, 0)
    return out
