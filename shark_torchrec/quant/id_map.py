"""The id map of a mixed table: each id's renumbered row, bit-packed in as few bits as the table
needs.

Every id of a mixed table goes through the id map to its renumbered row (its tier's rows are
contiguous; a SHARED row's entry points at its centroid).  An entry takes the fewest bits that
hold every renumbered row the table can have: its rows plus its most centroids (a table takes at
most a quarter of its rows, and at most :data:`MAX_CENTROIDS`, see
:mod:`~shark_torchrec.sharded.assign`), so the width depends on the table's rows alone and the
byte budget, the planner and the export count it without knowing the tiers: 11 bits for a
943-row table, 12 for 1,682 rows, 17 for 65,536, 24 for 16.7M (2, 2, 3 and 4 bytes before).

Entries are packed little-endian: entry ``i`` is bits ``i * bits`` to ``(i + 1) * bits - 1`` of
the table's map, bit ``j`` of byte ``b`` being bit ``8 b + j``.  So ``8``-, ``16``- and
``24``-bit entries are exactly the 1-, 2- and 3-byte little-endian entries of the maps written
before entries were packed (whose layouts give a width in bytes, read as ``8 x`` bits).

A group's map is one ``uint8`` buffer: each table's entries from a byte offset that is a
multiple of 4, and :data:`TAIL_BYTES` of slack at the end, because the fused CPU kernel reads
every entry as an 8-byte load from the byte it starts in and keeps the bits it needs (no branch
on the width per id).

What it saves: on a 64-dim table whose rows the budget leaves 16 bytes each (93.75% saved), a
2-byte entry is an eighth of what is left; 11 bits free a third of that for the rows.
"""

from __future__ import annotations

from typing import Optional

import torch

#: The most centroids a table (or shard) takes (:data:`~shark_torchrec.quant.shared_rows.K_CANDIDATES`).
MAX_CENTROIDS = 1024
#: The widest entry, in bits (renumbered rows are read as int32, so at most 2^31 of them; 32-bit
#: entries are those of the 4-byte maps written before entries were packed).
MAX_BITS = 32
#: Slack after a group's last entry: the kernel reads 8 bytes at every entry.
TAIL_BYTES = 8
#: Bytes an entry of at most :data:`MAX_BITS` bits spans, from the byte it starts in.
_SPAN = 5
#: Entries written at a time (:func:`write`).
_WRITE_ROWS = 1 << 18


def most_centroids(rows: int) -> int:
    """The most centroids a table of ``rows`` rows can take: a quarter of its rows (at least
    one, the mean row), at most :data:`MAX_CENTROIDS`."""
    return min(MAX_CENTROIDS, max(1, int(rows) // 4))


def entry_bits(rows: int) -> int:
    """Bits per id-map entry of a table of ``rows`` rows: the fewest that hold each of its
    renumbered rows (its rows plus its most centroids, :func:`most_centroids`)."""
    most = int(rows) + most_centroids(rows)
    return max(1, (most - 1).bit_length())


def entry_span(rows: int, bits: int) -> int:
    """Bytes the entries of ``rows`` rows of ``bits`` bits take, unpadded (a table's slice of
    its group's map)."""
    return (int(rows) * int(bits) + 7) // 8


def map_bytes(rows: int, bits: int) -> int:
    """Bytes the map of a table of ``rows`` rows with ``bits``-bit entries takes in its group's
    buffer (rounded up to 4)."""
    return (entry_span(rows, bits) + 3) // 4 * 4


def table_map_bytes(rows: int) -> int:
    """:func:`map_bytes` at the width :func:`entry_bits` gives: what a table's id map costs."""
    return map_bytes(rows, entry_bits(rows))


def check_width(table: str, rows: int, bits: int, renumbered: int) -> None:
    """Raise naming ``table`` if ``bits`` is not a valid entry width or cannot hold
    ``renumbered`` rows."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"table {table!r}: id-map entries must take 1 to {MAX_BITS} bits, got {bits!r}")
    if renumbered > min(1 << bits, 2**31):
        raise ValueError(f"table {table!r}: {renumbered} renumbered rows ({rows} rows and its centroids) "
                         f"do not fit {bits}-bit id-map entries")


def _span_word(buffer: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """The :data:`_SPAN` bytes from the byte holding each bit offset ``bit`` (int64) of
    ``buffer``, shifted so that bit ``bit`` is bit 0: int64 (a group's tail keeps them inside)."""
    byte = bit >> 3
    word = buffer[byte].to(torch.int64)
    for j in range(1, _SPAN):
        word |= buffer[byte + j].to(torch.int64) << (8 * j)
    return word >> (bit & 7)


def _read_at(buffer: torch.Tensor, bit: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit entries starting at bit offsets ``bit`` of ``buffer``: int64."""
    return _span_word(buffer, bit) & ((1 << bits) - 1)


def decode(raw: torch.Tensor, bits: int, n: Optional[int] = None) -> torch.Tensor:
    """The ``n`` entries of ``raw`` (uint8, a table's map as :func:`write` packs it; by default
    as many as it holds): int64 [n]."""
    n = raw.numel() * 8 // bits if n is None else int(n)
    padded = torch.cat([raw.reshape(-1), torch.zeros(_SPAN, dtype=torch.uint8, device=raw.device)])
    return _read_at(padded, torch.arange(n, device=raw.device, dtype=torch.int64) * bits, bits)


def gather(buffer: torch.Tensor, base: int, ids: torch.Tensor, bits: int) -> torch.Tensor:
    """Entries ``ids`` of the table whose map starts at byte ``base`` (a multiple of 4) of a
    group's map ``buffer`` (its tail included): int32.  8- and 16-bit entries are read through
    a typed view (one gather)."""
    if bits == 8:
        return buffer[base + ids.long()].to(torch.int32)
    if bits == 16:
        return buffer.view(torch.int16)[base // 2 + ids.long()].to(torch.int32) & 0xFFFF
    return _read_at(buffer, base * 8 + ids.to(torch.int64) * bits, bits).to(torch.int32)


def gather_bits(buffer: torch.Tensor, start: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Entries of a whole group's map at bit offsets ``start`` with widths ``bits`` (one per id;
    tables of different widths together, as on CUDA, without a host synchronisation): int32."""
    mask = (torch.ones_like(bits, dtype=torch.int64) << bits) - 1
    return (_span_word(buffer, start) & mask).to(torch.int32)


def write(buffer: torch.Tensor, base: int, rows: Optional[torch.Tensor], values: torch.Tensor, bits: int) -> None:
    """Set entries ``rows`` (distinct; all ``values.numel()`` first ones when None) of the
    table whose map starts at byte ``base`` of ``buffer`` to ``values``, in place.  Entries
    share bytes, so each touched byte is rewritten once, with every entry's bits in it (a
    chunk of entries at a time: memory in proportion to the chunk, not the table)."""
    n = values.numel()
    mask = (1 << bits) - 1
    if n and (int(values.min()) < 0 or int(values.max()) > mask):
        raise ValueError(f"id-map entries must lie in [0, {mask}] for {bits}-bit entries")
    device = buffer.device
    for r0 in range(0, n, _WRITE_ROWS):
        v = values[r0:r0 + _WRITE_ROWS].to(device=device, dtype=torch.int64)
        r = (torch.arange(r0, r0 + v.numel(), device=device) if rows is None
             else rows[r0:r0 + _WRITE_ROWS].to(device=device, dtype=torch.int64))
        bit = base * 8 + r * bits
        shift = (bit & 7).unsqueeze(1)
        j = torch.arange(_SPAN, device=device) * 8
        # The bytes each entry spans (a few past its last are harmless: their masks are 0).
        byte = ((bit >> 3).unsqueeze(1) + torch.arange(_SPAN, device=device)).reshape(-1)
        clear = (((mask << shift) >> j) & 0xFF).reshape(-1)
        put = (((v.unsqueeze(1) << shift) >> j) & 0xFF).reshape(-1)
        keep = clear != 0
        byte, clear, put = byte[keep], clear[keep], put[keep]
        # Entries' bits are disjoint, so their sums per byte are their ORs.  Rows in ascending
        # order touch bytes in ascending order (an entry's bytes end where the next one's start).
        ascending = rows is None or bool((r[1:] > r[:-1]).all())
        unique = torch.unique_consecutive if ascending else torch.unique
        touched, where = unique(byte, return_inverse=True)
        clear_sum = torch.zeros(touched.numel(), dtype=torch.int64, device=device).index_add_(0, where, clear)
        put_sum = torch.zeros(touched.numel(), dtype=torch.int64, device=device).index_add_(0, where, put)
        old = buffer[touched].to(torch.int64)
        buffer[touched] = ((old & ~clear_sum) | put_sum).to(torch.uint8)
