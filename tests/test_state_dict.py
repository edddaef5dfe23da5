"""The mixed collection's state dict: tensors only, TorchRec's names, each id map once; read by
state-dict tooling (``assert_close`` loops, ``torch.distributed.checkpoint``)."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.quant import RowwiseMixedEmbeddingBagCollection, assign_by_fractions


def _collection(seed: int = 0, num_groups: int = 2, rows2: int = 700):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1", "f2"]),
              EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=rows2, feature_names=["f3"]),
              EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=50, feature_names=["f1"])]
    ebc = EmbeddingBagCollection(tables=tables)
    assignment = assign_by_fractions({c.name: torch.rand(c.num_embeddings) for c in tables},
                                     {c.name: c.embedding_dim for c in tables}, {"fp16": 0.2, "int8": 0.3, "int4": 0.5})
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, assignment, num_groups=num_groups)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["f1", "f2", "f3"], torch.cat([torch.randint(50, (6,)), torch.randint(100, (4,)), torch.randint(rows2, (5,))]),
        torch.tensor([2, 2, 2, 1, 1, 2, 3, 1, 1]))
    return m, kjt


def test_names_are_torchrecs_and_every_entry_a_tensor_held_once() -> None:
    m, _ = _collection(rows2=70_000)
    state = m.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())  # no subclasses either
    subs = {f"embedding_bags.{t}@{tier}.weight" for t, rows in m.layout.rows.items()
            for tier, n in zip(m.layout.tiers, rows) if n > 0 and tier != "drop"}
    maps = {f"embedding_bags.{t}.id_map" for t in ("t1", "t2", "t3")}
    assert set(state) == subs | maps | {"_extra_state"}
    # each id map: its table's entries, bit-packed in its width (the bits its rows and most
    # centroids need: 100 + 25, 70,000 + 1,024, 50 + 12 renumbered rows)
    assert m.layout.map_bits == {"t1": 7, "t2": 17, "t3": 6}
    for t, rows in (("t1", 100), ("t2", 70_000), ("t3", 50)):
        entry = state[f"embedding_bags.{t}.id_map"]
        assert entry.dtype == torch.uint8 and entry.numel() == (rows * m.layout.map_bits[t] + 7) // 8
    # the sub-tables as TorchRec's quantized collection stores a table of that data type
    group = next(g for g in m.groups if "t2" in g.input_transform.table_base)
    assert torch.equal(state["embedding_bags.t2@int8.weight"], group.qebc.embedding_bags["t2@int8"].weight)
    # INT4 rows: the bytes of TorchRec's packed UInt4Tensor, as a plain uint8 tensor
    assert torch.equal(state["embedding_bags.t2@int4.weight"],
                       group.qebc.embedding_bags["t2@int4"].weight.view(torch.uint8))


def test_a_state_round_trips_and_tooling_reads_it(tmp_path) -> None:
    m, kjt = _collection(seed=1)
    other, _ = _collection(seed=2)
    assert not torch.equal(m(kjt).values(), other(kjt).values())
    # an assert_close loop over two states of the same layout (what peers' tests do)
    fresh = RowwiseMixedEmbeddingBagCollection(m.layout)
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    assert torch.equal(fresh(kjt).values(), m(kjt).values())
    # torch.distributed.checkpoint (no process group: one process)
    dcp.save(m.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    target = RowwiseMixedEmbeddingBagCollection(m.layout)
    state = target.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    target.load_state_dict(state)
    assert torch.equal(target(kjt).values(), m(kjt).values())
    # torch.save / from_state_dict
    torch.save(m.state_dict(), tmp_path / "m.pt")
    loaded = RowwiseMixedEmbeddingBagCollection.load(str(tmp_path / "m.pt"))
    assert torch.equal(loaded(kjt).values(), m(kjt).values())


def test_a_wrong_id_map_is_named() -> None:
    m, _ = _collection()
    state = m.state_dict()
    state["embedding_bags.t2.id_map"] = state["embedding_bags.t2.id_map"][:-3]
    with pytest.raises(ValueError, match=r"table 't2': id map embedding_bags.t2.id_map must be uint8 of 875 bytes \(10 bits per row\)"):
        RowwiseMixedEmbeddingBagCollection(m.layout).load_state_dict(state)
    del state["embedding_bags.t2.id_map"]
    with pytest.raises(ValueError, match=r"table 't2'.*got missing"):
        RowwiseMixedEmbeddingBagCollection(m.layout).load_state_dict(state)


def test_inside_a_model_the_names_take_its_prefix() -> None:
    m, kjt = _collection(num_groups=1)
    outer = torch.nn.ModuleDict({"ebc": m})
    state = outer.state_dict()
    assert "ebc.embedding_bags.t1.id_map" in state and "ebc._extra_state" in state
    assert not any(".groups." in k or "input_transform" in k for k in state)
    twin = torch.nn.ModuleDict({"ebc": RowwiseMixedEmbeddingBagCollection(m.layout)})
    twin.load_state_dict(state)
    assert torch.equal(twin["ebc"](kjt).values(), m(kjt).values())


def test_an_id_map_entry_past_the_stored_rows_is_named() -> None:
    """A loaded id map (of the right size) whose entry points past the table's stored rows: the
    fused kernel read outside its sub-tables (garbage, different each run).  An error naming
    the table and row; the map as saved loads."""
    from shark_torchrec.quant import id_map

    m, kjt = _collection()
    state = m.state_dict()
    key = "embedding_bags.t2.id_map"
    bits = m.groups[0].input_transform.table_bits.get("t2") or m.groups[1].input_transform.table_bits["t2"]
    raw = state[key].clone()
    entries = id_map.decode(raw, bits, 700)
    assert int(entries.max()) < 700
    bad = torch.zeros(raw.numel() + 8, dtype=torch.uint8)
    bad[:raw.numel()] = raw
    id_map.write(bad, 0, torch.tensor([123]), torch.tensor([(1 << bits) - 1]), bits)
    state[key] = bad[:raw.numel()].clone()
    with pytest.raises(ValueError, match=rf"table 't2': the id map's entry of row 123 is {(1 << bits) - 1}, past its "
                                         r"700 stored rows"):
        RowwiseMixedEmbeddingBagCollection(m.layout).load_state_dict(state)
    state[key] = raw
    fresh = RowwiseMixedEmbeddingBagCollection(m.layout)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(kjt).values(), m(kjt).values())


def test_a_table_named_with_an_at_sign_round_trips() -> None:
    """Sub-tables are named ``<table>@<tier>``: a table whose own name holds "@" was split at
    its first "@" on load (missing and unexpected keys)."""
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="user@v2", embedding_dim=8, num_embeddings=40, feature_names=["f"])]
    ebc = EmbeddingBagCollection(tables=tables)
    a = assign_by_fractions({"user@v2": torch.rand(40)}, {"user@v2": 8}, {"fp16": 0.5, "int8": 0.5})
    m = RowwiseMixedEmbeddingBagCollection.from_float(ebc, a)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 39, 7]), torch.tensor([2, 1]))
    fresh = RowwiseMixedEmbeddingBagCollection(m.layout)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(kjt).values(), m(kjt).values())
