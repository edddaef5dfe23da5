"""Saving and loading a mixed collection: its ``state_dict`` plus its
:class:`~shark_torchrec.quant.layout.MixedLayout`, read back with
``torch.load(weights_only=True)`` — no pickled objects besides TorchRec's packed 4-/2-bit tensor
types.

The state dict holds tensors only, under names close to TorchRec's quantized collection
(``embedding_bags.<table>.weight``), one entry per stored sub-table and one id map per table:

* ``embedding_bags.<table>.weight`` for a table whose rows are all in one stored tier (DROP
  rows aside) — exactly TorchRec's quantized collection's name and content for a table of that
  data type, so a float collection's keys are a subset of the mixed one's, as TorchRec's tests
  require of its own — and ``embedding_bags.<table>@<tier>.weight`` per tier for a mixed table:
  the rows in ``<tier>`` (uint8, FBGEMM's stored rows: for integer tiers the fp16 scale and bias
  first) — as plain uint8 tensors also for INT4/INT2,
  where TorchRec's holds its packed ``UInt4Tensor``/``UInt2Tensor`` types, which most tensor
  operations (``assert_close``, checkpoint tooling) do not support;
* ``embedding_bags.<table>.id_map``: the table's id map (uint8, ``map_bits[table]`` bits per
  row, packed, :mod:`~shark_torchrec.quant.id_map`);
* ``_extra_state``: the layout, as the uint8 bytes of its JSON text (so state-dict tooling
  that expects tensors — ``torch.distributed.checkpoint``, ``assert_close`` loops — takes it).

States saved before (``groups.<g>.qebc.embedding_bags...``, ``groups.<g>.input_transform.row_map``
and the same map again under ``input_transform.parts.<g>``, a dict as ``_extra_state``) load too.
"""

from __future__ import annotations

import json
from typing import Dict, Mapping, Union

import torch
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor, UIntXTensor

from shark_torchrec.quant import id_map
from shark_torchrec.quant.layout import MixedLayout
from shark_torchrec.quant.tiers import Tier

#: Where the collection's tables live in its state dict.
TABLES = "embedding_bags."
#: The suffix of a table's id map.
ID_MAP = ".id_map"


def read_state(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (written by ``torch.save(module.state_dict(), path)``)."""
    with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable mixed-collection state ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


def encode_layout(layout: MixedLayout) -> torch.Tensor:
    """The layout as a tensor: the uint8 bytes of its JSON text."""
    return torch.tensor(list(json.dumps(layout.to_dict(), sort_keys=True).encode()), dtype=torch.uint8)


def decode_layout(extra: Union[torch.Tensor, Mapping]) -> MixedLayout:
    """The layout of an ``_extra_state`` entry (:func:`encode_layout`'s tensor, or the dict of
    states saved before)."""
    if isinstance(extra, torch.Tensor):
        if extra.dtype != torch.uint8 or extra.dim() != 1:
            raise ValueError(f"a mixed collection's _extra_state must be uint8 JSON bytes, got {extra.dtype} "
                             f"{tuple(extra.shape)}")
        try:
            extra = json.loads(bytes(extra.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"a mixed collection's _extra_state is not a layout's JSON text ({e})") from e
    return MixedLayout.from_dict(extra)


def layout_of(state: Dict[str, torch.Tensor]) -> MixedLayout:
    """The layout a mixed collection's state dict carries."""
    if "_extra_state" not in state:
        raise ValueError("not a RowwiseMixedEmbeddingBagCollection state (no layout)")
    return decode_layout(state["_extra_state"])


def check_extra_state(layout: MixedLayout, state: Union[torch.Tensor, Mapping]) -> None:
    """A state can only be loaded into a collection laid out the same way."""
    if decode_layout(state) != layout:
        raise ValueError("the saved state is of a differently laid out mixed collection")


def single_tier(layout: MixedLayout) -> Dict[str, str]:
    """``{table: sub-table}`` for the tables stored in one sub-table (named as TorchRec names
    them, above)."""
    out = {}
    for t in layout.tables:
        subs = [tier for tier in layout.stored_tiers(t["name"]) if tier is not Tier.DROP]
        if len(subs) == 1:
            out[t["name"]] = f"{t['name']}@{subs[0].value}"
    return out


def public_names(groups, layout: MixedLayout, state: Dict[str, torch.Tensor], prefix: str) -> None:
    """State-dict hook of the collection: its groups' entries under the names above (in place)."""
    single = {sub: table for table, sub in single_tier(layout).items()}
    for g, group in enumerate(groups):
        internal = f"{prefix}groups.{g}."
        for key in [k for k in state if k.startswith(internal)]:
            value = state.pop(key)
            rest = key[len(internal):]
            if rest.startswith("qebc." + TABLES):
                if isinstance(value, UIntXTensor):
                    value = value.view(torch.uint8)  # its bytes (TorchRec's packed type: see above)
                sub, _, attr = rest[len("qebc." + TABLES):].partition(".")
                state[f"{prefix}{TABLES}{single.get(sub, sub)}.{attr}"] = value
            elif rest == "input_transform.row_map":
                t = group.input_transform
                for table in t.table_base:
                    base = t.table_base[table]
                    state[f"{prefix}{TABLES}{table}{ID_MAP}"] = value[base:base + t.table_map(table).numel()]
            else:  # (nothing else is held today: kept under its own name)
                state[key] = value
    for key in [k for k in state if k.startswith(prefix + "input_transform.")]:
        del state[key]  # the groups' id maps again (the collection's transform is theirs)


def _check_entries(table: str, row_map: torch.Tensor, base: int, bits: int, rows: int, renumbered: int) -> None:
    """Raise naming the table and row if an entry of its id map (loaded into ``row_map`` at
    byte ``base``) points past its ``renumbered`` stored rows: the fused kernel would read
    outside its sub-tables (a corrupt or foreign state).  Read 2^20 entries at a time."""
    for r0 in range(0, rows, 1 << 20):
        entries = id_map.gather(row_map, base, torch.arange(r0, min(rows, r0 + (1 << 20))), bits)
        if entries.numel() and int(entries.max()) >= renumbered:
            i = int(torch.argmax(entries))
            raise ValueError(f"table {table!r}: the id map's entry of row {r0 + i} is {int(entries[i])}, past its "
                             f"{renumbered} stored rows (a corrupt or foreign state)")


def internal_names(groups, layout: MixedLayout, state: Dict[str, torch.Tensor], prefix: str) -> None:
    """Load pre-hook of the collection: the names above back to where the groups hold them (in
    place); states saved with the internal names pass unchanged.  A table's id map of the wrong
    size raises naming the table."""
    group_of = {table: g for g, group in enumerate(groups) for table in group.input_transform.table_base}
    single = single_tier(layout)
    for key in [k for k in state if k.startswith(prefix + TABLES)]:
        name = key[len(prefix + TABLES):]
        sub, _, attr = name.partition(".")
        # (a table's own name may hold "@": its sub-tables are "<table>@<tier>")
        table = sub if sub in group_of else sub.rsplit("@", 1)[0]
        if table not in group_of:
            continue  # not this collection's: reported as unexpected
        g = group_of[table]
        if attr == ID_MAP[1:] and sub == table:
            continue  # id maps: below, per group
        sub = single.get(sub, sub)  # a one-tier table's TorchRec name
        state[f"{prefix}groups.{g}.qebc.{TABLES}{sub}.{attr}"] = state.pop(key)
    for g, group in enumerate(groups):  # INT4/INT2 bytes back into TorchRec's packed types
        internal = f"{prefix}groups.{g}.qebc.{TABLES}"
        for key in [k for k in state if k.startswith(internal)]:
            sub, _, attr = key[len(internal):].partition(".")
            bag = group.qebc.embedding_bags[sub] if group.qebc is not None and sub in group.qebc.embedding_bags \
                else None
            target = getattr(bag, attr, None) if bag is not None else None
            if isinstance(target, UIntXTensor) and not isinstance(state[key], UIntXTensor):
                state[key] = type(target)(state[key])
    for g, group in enumerate(groups):
        t = group.input_transform
        maps = {table: state.pop(f"{prefix}{TABLES}{table}{ID_MAP}", None) for table in t.table_base}
        if all(m is None for m in maps.values()):
            continue  # an old state's row_map, or missing (reported as such)
        row_map = torch.zeros_like(t.row_map)
        for table, m in maps.items():
            size = t.table_map(table).numel()
            if m is None or m.dtype != torch.uint8 or m.numel() != size:
                got = "missing" if m is None else f"{m.dtype} of {m.numel()} bytes"
                raise ValueError(f"table {table!r}: id map {prefix}{TABLES}{table}{ID_MAP} must be uint8 of "
                                 f"{size} bytes ({t.table_bits[table]} bits per row), got {got}")
            row_map[t.table_base[table]:t.table_base[table] + size] = m.reshape(-1).to(row_map.device)
        for table in maps:
            _check_entries(table, row_map, t.table_base[table], t.table_bits[table], t._table_rows[table],
                           sum(layout.rows[table]))
        state[f"{prefix}groups.{g}.input_transform.row_map"] = row_map
    for g, group in enumerate(groups):  # the collection's transform is the groups': the same map
        key = f"{prefix}groups.{g}.input_transform.row_map"
        if key in state:
            state[f"{prefix}input_transform.parts.{g}.row_map"] = state[key]
