"""Compressing a DMP-sharded model where its shards lie (tests/scripts/sharded_compress_run.py,
2 processes) gives what one process gives on the same tables."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection

from conftest import ROOT, run_torchrun
from shark_torchrec.quant import RowwiseQuantConfig, assign_tiers
from shark_torchrec.sharded import REPLICATED, Comm, ShardedLayout, assign_tiers_sharded

SCRIPT = ROOT / "tests" / "scripts" / "sharded_compress_run.py"
_RUNS: dict = {}


def _run(tmp_path: Path, types: str) -> dict:
    if types not in _RUNS:
        out = tmp_path / f"sharded_{len(_RUNS)}.pt"
        export = tmp_path / f"export_{len(_RUNS)}"
        run_torchrun(SCRIPT, ["--out", out, "--types", types, "--export", export], nproc=2)
        _RUNS[types] = torch.load(out, weights_only=False)
        _RUNS[types]["export"] = export
    return _RUNS[types]


def _one_process_layout(layout: ShardedLayout) -> ShardedLayout:
    """The same shards, every one in this process."""
    shards = [dataclasses.replace(s, rank=s.rank if s.rank == REPLICATED else 0) for s in layout.shards]
    return ShardedLayout(layout.tables, shards, 1, layout.is_weighted)


@pytest.mark.slow
def test_every_sharding_type_gets_the_tiers_one_process_gets(tmp_path: Path) -> None:
    run = _run(tmp_path, "table_wise,row_wise,column_wise,table_row_wise,data_parallel,table_column_wise")
    layout = ShardedLayout.from_dict(run["layout"])
    kinds = {t["name"]: {(s.rank, s.rows, s.cols) for s in layout.shards_of(t["name"])} for t in layout.tables}
    assert len(kinds["t_f1"]) == 2 and {r for r, _, _ in kinds["t_f1"]} == {0, 1}  # row-wise over both
    assert {c for _, _, c in kinds["t_f2"]} == {8} and {r for r, _, _ in kinds["t_f2"]} == {0, 1}  # column-wise
    assert {r for r, _, _ in kinds["t_f4"]} == {REPLICATED}  # data parallel
    one = _one_process_layout(layout)
    weights = {s.name: run["weights"][s.table][s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
               for s in one.shards}
    prio = run["priorities"]
    for name, kwargs in json.loads(run["policies"]).items():
        ref = assign_tiers_sharded(one, weights, RowwiseQuantConfig(**kwargs),
                                   lambda t, r0, n: prio[t][r0:r0 + n], Comm.local())
        got = run["tiers"][name]
        assert set(got) == set(ref.tiers), name
        for shard, tiers in ref.tiers.items():
            assert torch.equal(got[shard], tiers), (name, shard)
        assert run["rows_per_tier"][name] == ref.rows_per_tier
        assert run["centroids"][name] == ref.centroids
        # the blocks of a column-wise row share its tier
        assert torch.equal(got["t_f2#0"], got["t_f2#1"]) and torch.equal(got["t_f5#0"], got["t_f5#1"])
    # data-parallel copies that differ between ranks: refused on every rank, naming the table
    assert run["replica_messages"] == ["table 't_f4' is data-parallel, but its copy on rank(s) [1] differs from "
                                       "rank 0's: the replicas must agree before compression (sync them, e.g. "
                                       "broadcast rank 0's weights)"] * 2
    # a table of fewer rows than ranks, sharded row-wise: a clear error on every rank, not a hang
    assert run["zero_row_error"].startswith("table 'one' (1 rows) is sharded over more ranks than it has rows")
    # the policies really differ, and a budget does compress
    b = run["rows_per_tier"]["budget"]
    assert sum(n for t in b.values() for n in t[:2]) < sum(n for t in b.values() for n in t[2:])


@pytest.mark.slow
def test_row_sharded_tables_get_the_tiers_of_the_unsharded_collection(tmp_path: Path) -> None:
    """Without column blocks, the sharded assignment equals ``assign_tiers`` on the plain
    collection holding the whole tables."""
    run = _run(tmp_path, "table_wise,row_wise,table_row_wise,data_parallel")
    layout = ShardedLayout.from_dict(run["layout"])
    ebc = EmbeddingBagCollection(tables=layout.configs())
    with torch.no_grad():
        for t, w in run["weights"].items():
            ebc.embedding_bags[t].weight.copy_(w)
    for name, kwargs in json.loads(run["policies"]).items():
        if "shared" in kwargs.get("tiers", ()):
            continue  # centroids are per shard: a row-wise sharded table's differ from the whole table's
        ref = assign_tiers(ebc, RowwiseQuantConfig(**kwargs), run["priorities"])
        for s in layout.shards:
            assert torch.equal(run["tiers"][name][s.name], ref.tiers[s.table][s.row_offset:s.row_offset + s.rows]), \
                (name, s.name)


def _dequantized_collection(layout: ShardedLayout, weights, tiers, shared, row_fit: str) -> EmbeddingBagCollection:
    """TorchRec's float collection holding every row as its shard stores it (each column block
    quantized apart with ``row_fit``, DROP rows zero, SHARED rows their shard's centroid): the
    reference a sharded mixed collection must equal."""
    from shark_torchrec.quant import TIER_ORDER, Tier, dequantize_rows

    ebc = EmbeddingBagCollection(tables=layout.configs())
    with torch.no_grad():
        for s in layout.shards:
            w = weights[s.table][s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
            deq = torch.zeros_like(w)
            for i, tier in enumerate(TIER_ORDER):
                rows = tiers[s.name].long() == i
                if rows.any() and tier is Tier.SHARED:
                    centroids, index = shared[s.name]
                    deq[rows] = centroids[index[rows].long()]
                elif rows.any():
                    deq[rows] = dequantize_rows(w[rows], tier, row_fit=row_fit)
            ebc.embedding_bags[s.table].weight[s.row_offset:s.row_offset + s.rows,
                                               s.col_offset:s.col_offset + s.cols] = deq
    return ebc


@pytest.mark.slow
def test_the_converted_model_serves_sharded_what_the_dequantized_tables_give(tmp_path: Path) -> None:
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    run = _run(tmp_path, "table_wise,row_wise,column_wise,table_row_wise,data_parallel,table_column_wise")
    layout = ShardedLayout.from_dict(run["layout"])
    row_fit = json.loads(run["policies"])["shared"]["row_fit"]
    assert row_fit == "lsq"  # the served model's integer rows are fitted (torch reference, kernel conversion)
    ebc = _dequantized_collection(layout, run["weights"], run["served_tiers"], run["served_shared"], row_fit)
    assert run["served_tiers"].keys() == {s.name for s in layout.shards}
    # SHARED rows in every kind of shard but the column blocks, each shard its own centroids
    from shark_torchrec.quant import TIER_ORDER, Tier

    shared = {k for k, t in run["served_tiers"].items() if bool((t == TIER_ORDER.index(Tier.SHARED)).any())}
    assert shared == set(run["served_shared"]) and {"t_f1#0", "t_f1#1", "t_f0#0", "t_f4#0"} <= shared
    assert not {k for k in shared if k.startswith(("t_f2", "t_f5"))}
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, 16],
                           over_arch_layer_sizes=[8, 1]))
    missing, unexpected = model.load_state_dict(run["dense"], strict=False)
    assert not unexpected and all(".embedding_bags." in k for k in missing)
    features = run["features"]
    for served in run["served"]:
        dense, lengths, values = served["batch"]
        kjt = KeyedJaggedTensor.from_lengths_sync(features, torch.cat(values), lengths.reshape(-1))
        with torch.no_grad():
            want = ebc(kjt)
            logits = model.model(dense, kjt).reshape(-1)
        assert served["keys"] == want.keys()
        torch.testing.assert_close(served["pooled"], want.values(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(served["logits"], logits, rtol=1e-5, atol=1e-6)
    assert all(a and b for a, b in run["fp16_matches"])  # output_dtype fp16: the same values, in fp16
    # each table reports the data type of its most precise tier holding rows over every shard
    # (FP16 also for the centroids of SHARED rows), the same on every rank
    names = {t: [k for k in run["served_tiers"] if k.split("#")[0] == t] for t in {c.name for c in layout.configs()}}
    want_types = {}
    for t, shards in names.items():
        present = set(int(i) for k in shards for i in run["served_tiers"][k].unique())
        if any(k in run["served_shared"] for k in shards):
            present.add(TIER_ORDER.index(Tier.FP16))
        stored = [TIER_ORDER[i] for i in sorted(present) if TIER_ORDER[i] not in (Tier.SHARED, Tier.DROP)]
        want_types[t] = stored[0].value.upper() if stored else "INT2"
    assert run["data_types"][0] == run["data_types"][1] == want_types
    assert run["tracker_tiers_agree"]  # priorities from a sharded RowPriority, asked for by each leader
    # a bad id in rank 1's batch: both ranks raised, rank 1 naming it
    m0, m1 = run["bad_id_messages"]
    assert m1 is not None and "id 10000 is outside table" in m1
    assert m0 == "rank 1's batch was refused: malformed or an id outside its table (that rank's error says which)"
    m0, m1 = run["malformed_messages"]
    assert m0 is not None and "lengths add up to" in m0 and "ids were given" in m0
    assert m1 is not None and m1.startswith("rank 0's batch was refused")
    # the tables really were quantized (the values are not the fp32 ones)
    fp32 = EmbeddingBagCollection(tables=layout.configs())
    with torch.no_grad():
        for t, w in run["weights"].items():
            fp32.embedding_bags[t].weight.copy_(w)
        assert (fp32(kjt).values() - ebc(kjt).values()).abs().max() > 1e-3


@pytest.mark.slow
def test_the_sharded_export_loads_on_any_number_of_processes(tmp_path: Path) -> None:
    """Written by 2 processes; loaded by 2 (each shard where it was), by this one process and
    by 3 (placed anew): the same logits every time."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from shark_torchrec.export import load_export

    run = _run(tmp_path, "table_wise,row_wise,column_wise,table_row_wise,data_parallel,table_column_wise")
    served = run["served"]
    for item, again in zip(served, run["reloaded_logits"]):
        assert torch.equal(again, item["logits"])
    assert ShardedLayout.from_dict(run["reload_placement"]) == ShardedLayout.from_dict(run["layout"])
    model, info = load_export(str(run["export"]))  # one plain process: every shard here
    assert info["metadata"] == {"note": "test"} and info["placement"].world_size == 1
    for item in served:
        dense, lengths, values = item["batch"]
        kjt = KeyedJaggedTensor.from_lengths_sync(run["features"], torch.cat(values), lengths.reshape(-1))
        torch.testing.assert_close(model.model(dense, kjt).reshape(-1), item["logits"], rtol=1e-6, atol=1e-7)
    batches = tmp_path / "batches.pt"
    torch.save({"features": run["features"], "batches": [item["batch"] for item in served]}, batches)
    out = tmp_path / "three.pt"
    run_torchrun(ROOT / "tests" / "scripts" / "sharded_load_run.py",
                 ["--export", run["export"], "--batches", batches, "--out", out], nproc=3)
    three = torch.load(out, weights_only=False)
    assert all(three["shards_per_rank"])  # every one of the 3 ranks holds shards
    for got, item in zip(three["logits"], served):
        torch.testing.assert_close(got, item["logits"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_missing_truncated_or_foreign_part_is_an_error_naming_it(tmp_path: Path) -> None:
    import hashlib
    import shutil

    from shark_torchrec.export import ExportError, load_export
    from shark_torchrec.sharded.export import export_sharded

    run = _run(tmp_path, "table_wise,row_wise,column_wise,table_row_wise,data_parallel,table_column_wise")
    model, _ = load_export(str(run["export"]))
    other = tmp_path / "other"
    export_sharded(model, str(other))  # another export of the same model, by one process

    def broken(name):
        d = tmp_path / name
        shutil.copytree(run["export"], d)
        return d

    d = broken("missing")
    (d / "part-00001.pt").unlink()
    with pytest.raises(ExportError, match=r"missing/part-00001\.pt: part of the export is missing"):
        load_export(str(d))
    d = broken("truncated")
    data = (d / "part-00000.pt").read_bytes()
    (d / "part-00000.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"truncated/part-00000\.pt: \d+ bytes, the manifest says"):
        load_export(str(d))
    d = broken("foreign")
    shutil.copy(other / "part-00000.pt", d / "part-00000.pt")
    with pytest.raises(ExportError, match=r"foreign/part-00000\.pt: "):
        load_export(str(d))
    # even with the manifest edited to its size and checksum, its export id gives it away
    manifest = json.loads((d / "manifest.json").read_text())
    part = next(p for p in manifest["parts"] if p["file"] == "part-00000.pt")
    part["bytes"] = (d / "part-00000.pt").stat().st_size
    part["sha256"] = hashlib.sha256((d / "part-00000.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"foreign/part-00000\.pt: a part of another export"):
        load_export(str(d))
    d = broken("bad_manifest")
    (d / "manifest.json").write_text("{")
    with pytest.raises(ExportError, match=r"bad_manifest/manifest\.json: not valid JSON"):
        load_export(str(d))
    d = broken("bad_plan")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["pruning_plan"] = "{not json"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"bad_plan/manifest\.json: field 'pruning_plan' is not valid JSON"):
        load_export(str(d))


@pytest.mark.slow
def test_weighted_bags_are_served_sharded_with_their_weights(tmp_path: Path) -> None:
    """Per-id weights travel with their ids to the shards (table-, row- and column-wise) and
    weigh each id's row; a MEAN bag is divided by its length (tests/scripts/sharded_weighted_run.py)."""
    out = tmp_path / "weighted"
    run_torchrun(ROOT / "tests" / "scripts" / "sharded_weighted_run.py", ["--out", out], nproc=2)
    for rank in range(2):
        saved = torch.load(f"{out}.{rank}", weights_only=False)
        for r in saved["results"]:
            lengths, weights = r["lengths"], r["weights"]
            start = 0
            for i, (key, rows) in enumerate(r["rows"].items()):
                n = rows.shape[0]
                bag = torch.repeat_interleave(torch.arange(lengths.shape[1]), lengths[i])
                want = torch.zeros(lengths.shape[1], rows.shape[1]).index_add_(
                    0, bag, rows * weights[start:start + n, None])
                if key == saved["mean_key"]:
                    want /= lengths[i].clamp(min=1)[:, None].float()
                start += n
                assert (want != 0).any()
                torch.testing.assert_close(r["pooled"][key], want, rtol=1e-5, atol=1e-6)
