"""The bit-packed id map: the bits a table's rows need, read exactly by both lookups, counted
by the budget, and the maps written before (int32, whole-byte entries) still loaded."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant import TIER_ORDER, RowwiseMixedEmbeddingBagCollection, Tier
from shark_torchrec.quant import id_map
from shark_torchrec.quant.shared_rows import K_CANDIDATES, cluster_rows
from test_shared_rows import _reference  # each row as the collection stores it

SHARED = TIER_ORDER.index(Tier.SHARED)


def test_the_width_is_the_fewest_bits_that_hold_every_renumbered_row() -> None:
    assert id_map.MAX_CENTROIDS == max(K_CANDIDATES)
    # renumbered rows: at most the table's rows plus its centroids (a quarter of its rows, at
    # least 1, at most 1,024), each an entry below 2^bits
    for rows in (1, 2, 3, 7, 19, 943, 1682, 65_536, 70_000, 2**24, 10**9):
        most = rows + min(1024, max(1, rows // 4))
        assert id_map.entry_bits(rows) == max(1, math.ceil(math.log2(most))), rows
    assert id_map.entry_bits(943) == 11 and id_map.entry_bits(1682) == 12
    assert id_map.entry_bits(2**16 - 1024) == 16 and id_map.entry_bits(2**16 - 1023) == 17
    assert id_map.table_map_bytes(101) == 92  # 101 rows x 7 bits (126 renumbered rows): 88.4 bytes, to 4
    assert id_map.table_map_bytes(943) == 1300  # 943 x 11 bits = 1,296.6 bytes, rounded up to 4
    assert id_map.table_map_bytes(100_000) == 212_500  # 17 bits


@pytest.mark.parametrize("bits", [1, 5, 8, 11, 16, 17, 24, 31, 32])
def test_entries_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    top = min(2**bits, 2**31) - 1
    values = torch.randint(0, top + 1, (1000,), generator=g)
    values[:2] = torch.tensor([0, top])
    raw = torch.zeros((1000 * bits + 7) // 8, dtype=torch.uint8)
    id_map.write(raw, 0, None, values, bits)
    assert raw.dtype == torch.uint8 and raw.numel() == (1000 * bits + 7) // 8
    assert torch.equal(id_map.decode(raw, bits, 1000), values)
    # bit i*bits + j of the map is bit j of entry i (little-endian packing, by hand)
    bit_of = lambda b: (int(raw[b // 8]) >> (b % 8)) & 1  # noqa: E731
    for i in (0, 1, 2, 999):
        assert sum(bit_of(i * bits + j) << j for j in range(bits)) == int(values[i])
    # in a group's buffer, from a byte offset that is a multiple of 4, tail included
    buffer = torch.cat([torch.zeros(8, dtype=torch.uint8), raw,
                        torch.zeros(id_map.TAIL_BYTES + (-raw.numel()) % 4, dtype=torch.uint8)])
    ids = torch.randint(0, 1000, (5000,), generator=g)
    assert torch.equal(id_map.gather(buffer, 8, ids, bits).long(), values[ids])
    got = id_map.gather_bits(buffer, 64 + ids * bits, torch.full_like(ids, bits))
    assert torch.equal(got.long(), values[ids])
    # some entries rewritten in place: their neighbours' bits untouched
    rows = torch.randperm(1000, generator=g)[:300]
    new = torch.randint(0, top + 1, (300,), generator=g)
    id_map.write(buffer, 8, rows, new, bits)
    want = values.clone()
    want[rows] = new
    assert torch.equal(id_map.gather(buffer, 8, torch.arange(1000), bits).long(), want)
    assert not buffer[:8].any() and not buffer[8 + raw.numel():].any()


def test_a_width_too_small_for_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="table 't'.*do not fit 16-bit"):
        id_map.check_width("t", 70_000, 16, 70_000)
    with pytest.raises(ValueError, match="table 't'.*1 to 32 bits"):
        id_map.check_width("t", 10, 0, 10)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2047\]"):
        id_map.write(torch.zeros(64, dtype=torch.uint8), 0, None, torch.tensor([2048]), 11)


def _tables(rows_a: int = 400):
    torch.manual_seed(5)
    configs = [EmbeddingBagConfig(name="a", num_embeddings=rows_a, embedding_dim=8, feature_names=["fa"]),
               EmbeddingBagConfig(name="b", num_embeddings=90, embedding_dim=16, feature_names=["fb"],
                                  pooling=PoolingType.MEAN)]
    weights = {c.name: torch.randn(c.num_embeddings, c.embedding_dim) for c in configs}
    tiers = {c.name: torch.randint(0, len(TIER_ORDER), (c.num_embeddings,), dtype=torch.int8) for c in configs}
    tiers["a"][:40] = SHARED
    shared = {"a": cluster_rows(weights["a"], None, 16), "b": cluster_rows(weights["b"], None, 1)}
    return configs, weights, tiers, shared


def _batch(configs, B: int = 64) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 6, (len(configs) * B,))
    values = torch.cat([torch.randint(c.num_embeddings, (int(lengths[i * B:(i + 1) * B].sum()),))
                        for i, c in enumerate(configs)])
    return KeyedJaggedTensor.from_lengths_sync([c.feature_names[0] for c in configs], values, lengths)


def _check_exact(m, configs, weights, tiers, shared, kjt) -> None:
    out = m(kjt)
    for c in configs:
        f = c.feature_names[0]
        j = kjt[f]
        table = _reference(weights[c.name], tiers[c.name], shared[c.name])
        mode = "sum" if c.pooling == PoolingType.SUM else "mean"
        want = F.embedding_bag(j.values(), table, j.offsets()[:-1], mode=mode)
        torch.testing.assert_close(out[f], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("bits", [None, 9, 13, 16, 24, 32])
def test_every_width_reads_exactly_in_both_lookups(bits, use_kernel: bool) -> None:
    """Entries of the bits the tables need (None: 9 and 7) and of forced widths, every tier,
    SHARED and DROP rows, through the fused CPU kernel and FBGEMM's bucketize + TBE path, exact
    against F.embedding_bag on the rows as stored; and after a save/load round trip."""
    configs, weights, tiers, shared = _tables()
    forced = None if bits is None else {"a": bits, "b": bits}
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared,
                                                        map_bits=forced)
    m.use_cpu_kernel = use_kernel
    want = {"a": 9, "b": 7} if bits is None else forced  # 400 + 100 and 90 + 22 renumbered rows
    assert m.layout.map_bits == want
    assert m.memory_report()["id_map_bytes"] == (id_map.map_bytes(400, want["a"]) + id_map.map_bytes(90, want["b"])
                                                 + id_map.TAIL_BYTES)
    kjt = _batch(configs)
    _check_exact(m, configs, weights, tiers, shared, kjt)
    loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(m.state_dict())
    loaded.use_cpu_kernel = use_kernel
    assert loaded.layout.map_bits == want
    assert torch.equal(loaded(kjt).values(), m(kjt).values())


def test_a_table_beyond_two_bytes_takes_the_bits_it_needs() -> None:
    """70,000 rows: 17-bit entries by default, read exactly by both lookups (ids across the
    whole table, the last row included)."""
    configs, weights, tiers, shared = _tables(rows_a=70_000)
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared)
    assert m.layout.map_bits == {"a": 17, "b": 7}
    assert m.memory_report()["id_map_bytes"] == 148_752 + 80 + id_map.TAIL_BYTES  # 148,750 and 79 bytes, to 4
    kjt = _batch(configs)
    values = kjt.values().clone()
    values[0] = 69_999
    kjt = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    for use_kernel in (True, False):
        m.use_cpu_kernel = use_kernel
        _check_exact(m, configs, weights, tiers, shared, kjt)


def test_a_state_saved_with_an_int32_map_still_loads() -> None:
    """A state dict written before entries had a width (an int32 ``row_map``, a layout without
    a width) loads as 32-bit entries and reads the same."""
    configs, weights, tiers, shared = _tables()
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared,
                                                        map_bits={"a": 32, "b": 32})
    state = m.state_dict()
    # the old form: internal names, one int32 map per group (twice), the layout as a dict
    old = {f"groups.0.qebc.{k}": v for k, v in state.items() if k.endswith(".weight")}
    maps = torch.cat([id_map.decode(state[f"embedding_bags.{t}.id_map"], 32) for t in ("a", "b")]).to(torch.int32)
    old["groups.0.input_transform.row_map"] = old["input_transform.parts.0.row_map"] = maps
    old["_extra_state"] = {k: v for k, v in m.layout.to_dict().items() if k != "map_bits"}
    old["_extra_state"]["format"] = "shark-torchrec/rowwise-mixed-ebc/v1"
    loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(old)
    assert loaded.layout.map_bits == {"a": 32, "b": 32}
    kjt = _batch(configs)
    for use_kernel in (True, False):
        loaded.use_cpu_kernel = use_kernel
        _check_exact(loaded, configs, weights, tiers, shared, kjt)


def test_a_state_saved_with_whole_byte_entries_still_loads() -> None:
    """A state written before entries were bit-packed (a v1 layout with ``map_bytes``, 2- and
    3-byte entries, a 4-byte tail on the internal map) is the same bytes as 16- and 24-bit
    entries: it loads, public and internal names alike, and reads the same."""
    configs, weights, tiers, shared = _tables()
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared,
                                                        map_bits={"a": 16, "b": 24})
    state = m.state_dict()
    layout = {k: v for k, v in m.layout.to_dict().items() if k != "map_bits"}
    layout.update(format="shark-torchrec/rowwise-mixed-ebc/v1", map_bytes={"a": 2, "b": 3})
    # whole-byte entries, written as the code before packing wrote them (little-endian bytes)
    for t, w in (("a", 2), ("b", 3)):
        values = id_map.decode(state[f"embedding_bags.{t}.id_map"], 8 * w)
        assert torch.equal(state[f"embedding_bags.{t}.id_map"],
                           ((values.unsqueeze(1) >> (8 * torch.arange(w))) & 0xFF).to(torch.uint8).reshape(-1))
    public = dict(state)
    public["_extra_state"] = layout
    internal = {f"groups.0.qebc.{k}": v for k, v in state.items() if k.endswith(".weight")}
    row_map = m.groups[0].input_transform.row_map
    internal["groups.0.input_transform.row_map"] = row_map[:row_map.numel() - 4].clone()  # the old 4-byte tail
    internal["_extra_state"] = layout
    kjt = _batch(configs)
    for old in (public, internal):
        loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(old)
        assert loaded.layout.map_bits == {"a": 16, "b": 24}
        for use_kernel in (True, False):
            loaded.use_cpu_kernel = use_kernel
            _check_exact(loaded, configs, weights, tiers, shared, kjt)


def test_a_sharded_exports_saved_width_is_read_in_bits() -> None:
    """A saved shard's width: ``map_bits``; 8x ``map_bytes`` (parts written before entries were
    packed: the same bytes); 32 for the int32 maps written before the width was saved."""
    from shark_torchrec.sharded.export import _saved_map_bits

    raw = torch.zeros(12, dtype=torch.uint8)
    assert _saved_map_bits({"row_map": raw, "map_bits": 11}) == 11
    assert _saved_map_bits({"row_map": raw, "map_bytes": 3}) == 24
    assert _saved_map_bits({"row_map": raw.view(torch.int32)}) == 32
