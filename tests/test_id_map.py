"""The id map in 2, 3 or 4 bytes per row: what a table's rows need, read exactly by both lookups,
counted by the budget, and old int32 maps still loaded."""

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


def test_the_width_is_the_fewest_bytes_that_hold_every_renumbered_row() -> None:
    assert id_map.MAX_CENTROIDS == max(K_CANDIDATES)
    # renumbered rows: at most the table's rows plus its centroids
    assert id_map.entry_bytes(1) == 2
    assert id_map.entry_bytes(65_536 - 1024) == 2
    assert id_map.entry_bytes(65_536 - 1023) == 3
    assert id_map.entry_bytes(2**24 - 1024) == 3
    assert id_map.entry_bytes(2**24 - 1023) == 4
    assert id_map.table_map_bytes(101) == 204  # 202 bytes, rounded up to 4
    assert id_map.table_map_bytes(100_000) == 300_000


@pytest.mark.parametrize("width", [2, 3, 4])
def test_entries_round_trip(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    top = 2**31 - 1 if width == 4 else 2 ** (8 * width) - 1
    values = torch.randint(0, top, (1000,), generator=g)
    values[:2] = torch.tensor([0, top])
    raw = id_map.encode(values, width)
    assert raw.dtype == torch.uint8 and raw.numel() == 1000 * width
    assert torch.equal(id_map.decode(raw, width), values)
    ids = torch.randint(0, 1000, (5000,), generator=g)
    assert torch.equal(id_map.gather(raw, ids, width).long(), values[ids])
    # a whole group's buffer (tail included), read per id with its width
    buffer = torch.cat([raw, torch.zeros(id_map.TAIL_BYTES, dtype=torch.uint8)])
    got = id_map.gather_bytes(buffer, ids * width, torch.full_like(ids, width))
    assert torch.equal(got.long(), values[ids])


def test_a_width_too_small_for_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="table 't'.*do not fit 2-byte"):
        id_map.check_width("t", 70_000, 2, 70_000)
    with pytest.raises(ValueError, match="table 't'.*one of"):
        id_map.check_width("t", 10, 1, 10)


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
@pytest.mark.parametrize("width", [2, 3, 4])
def test_every_width_reads_exactly_in_both_lookups(width: int, use_kernel: bool) -> None:
    """Entries of 2, 3 and 4 bytes (forced on small tables), every tier, SHARED and DROP rows,
    through the fused CPU kernel and FBGEMM's bucketize + TBE path, exact against
    F.embedding_bag on the rows as stored; and after a save/load round trip."""
    configs, weights, tiers, shared = _tables()
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared,
                                                        map_bytes={"a": width, "b": width})
    m.use_cpu_kernel = use_kernel
    assert m.layout.map_bytes == {"a": width, "b": width}
    assert m.memory_report()["id_map_bytes"] == id_map.map_bytes(400, width) + id_map.map_bytes(90, width) + 4
    kjt = _batch(configs)
    _check_exact(m, configs, weights, tiers, shared, kjt)
    loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(m.state_dict())
    loaded.use_cpu_kernel = use_kernel
    assert loaded.layout.map_bytes == {"a": width, "b": width}
    assert torch.equal(loaded(kjt).values(), m(kjt).values())


def test_a_table_beyond_two_bytes_takes_three() -> None:
    """70,000 rows: 3-byte entries by default, read exactly by both lookups (ids across the
    whole table, the last row included)."""
    configs, weights, tiers, shared = _tables(rows_a=70_000)
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared)
    assert m.layout.map_bytes == {"a": 3, "b": 2}
    assert m.memory_report()["id_map_bytes"] == 210_000 + 180 + 4
    kjt = _batch(configs)
    values = kjt.values().clone()
    values[0] = 69_999
    kjt = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    for use_kernel in (True, False):
        m.use_cpu_kernel = use_kernel
        _check_exact(m, configs, weights, tiers, shared, kjt)


def test_a_state_saved_with_an_int32_map_still_loads() -> None:
    """A state dict written before entries had a width (an int32 ``row_map``, a layout without
    ``map_bytes``) loads as 4-byte entries and reads the same."""
    configs, weights, tiers, shared = _tables()
    m = RowwiseMixedEmbeddingBagCollection.from_weights(configs, weights, tiers, row_alignment=1, shared=shared,
                                                        map_bytes={"a": 4, "b": 4})
    state = m.state_dict()
    # the old form: internal names, one int32 map per group (twice), the layout as a dict
    old = {f"groups.0.qebc.{k}": v for k, v in state.items() if k.endswith(".weight")}
    maps = torch.cat([id_map.decode(state[f"embedding_bags.{t}.id_map"], 4) for t in ("a", "b")]).to(torch.int32)
    old["groups.0.input_transform.row_map"] = old["input_transform.parts.0.row_map"] = maps
    old["_extra_state"] = {k: v for k, v in m.layout.to_dict().items() if k != "map_bytes"}
    loaded = RowwiseMixedEmbeddingBagCollection.from_state_dict(old)
    assert loaded.layout.map_bytes == {"a": 4, "b": 4}
    kjt = _batch(configs)
    for use_kernel in (True, False):
        loaded.use_cpu_kernel = use_kernel
        _check_exact(loaded, configs, weights, tiers, shared, kjt)
