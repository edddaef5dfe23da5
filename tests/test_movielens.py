"""MovieLens-100K (`--data ml100k`): the converter on hand-written atomic files, the real data
from RecBole's wheel (fetched with pip; skipped when it cannot be), and the SHARK recipe end
to end on a slice of it."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from shark_torchrec.data import ClickLogDataset, load_schema_file
from shark_torchrec.data.movielens import (
    FULL_COUNTS,
    DatasetUnavailableError,
    age_bucket,
    convert,
    ensure_ml100k,
    fetch_recbole_wheel,
    read_atomic_files,
)
from shark_torchrec.export import load_export
from shark_torchrec.quant import RowwiseMixedEmbeddingBagCollection

SLICE = 3000  # ratings in the tests' slice


def _write_atomic(d: Path) -> None:
    d.mkdir()
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n"
        "2\t53\tF\tother\t94043\n"
        "3\t17\tM\twriter\tT8H1N\n")
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tLand Before Time III (1995)\tV\tAnimation\n"
        "3\tunkonwn\tunkonwn\tunknown\n")
    ratings = [(1, 1, 5, 100), (1, 2, 3, 300), (2, 1, 4, 200), (2, 3, 1, 400),
               (3, 2, 4, 500), (3, 3, 2, 600), (1, 3, 4, 700), (2, 2, 5, 800)]
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))


def _read_tsv(path: Path):
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_converter_on_hand_written_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_atomic(src)
    out = tmp_path / "out"
    meta = convert(str(out), source=str(src), valid_fraction=0.25, test_fraction=0.25, seed=1)
    assert {k: v["rows"] for k, v in meta["splits"].items()} == {"train": 4, "valid": 2, "test": 2}
    rows = [r for name in ("train", "valid", "test") for r in _read_tsv(out / f"{name}.tsv")]
    by_time = {r["timestamp"]: r for r in rows}
    assert sorted(by_time) == ["100", "200", "300", "400", "500", "600", "700", "800"]
    # Hand-derived: label = rating >= 4; the joins; the year from the title when the item's
    # own is not a year; missing when neither has one.
    assert by_time["100"] == {"label": "1", "user_id": "1", "item_id": "1", "age": "24", "age_bucket": "18-24",
                              "gender": "M", "occupation": "technician", "zip_code": "85711",
                              "release_year": "1995", "genres": "Animation|Children's|Comedy",
                              "rating": "5", "timestamp": "100"}
    assert by_time["500"]["release_year"] == "1995" and by_time["500"]["age_bucket"] == "<18"
    assert by_time["400"]["release_year"] == "" and by_time["400"]["genres"] == "unknown"
    assert [by_time[t]["label"] for t in sorted(by_time)] == ["1", "1", "0", "0", "1", "0", "1", "1"]
    sf = load_schema_file(str(out / "schema.yaml"))
    s = sf.schema
    assert s.sparse_feature_names == ["user_id", "item_id", "age_bucket", "gender", "occupation", "zip_code",
                                      "release_year", "genres"]
    assert s.vocabularies["gender"] == ["F", "M"] and s.vocabularies["release_year"] == ["1995"]
    assert s.vocabularies["zip_code"] == ["85711", "94043", "T8H1N"]
    assert s.vocabularies["genres"] == ["Animation", "Children's", "Comedy", "unknown"]
    assert sf.sizes(0) == [4, 4, 8, 3, 4, 4, 2, 5]  # ids + row 0; vocabularies + 1
    # The missing year is an empty bag; the rest read as their vocabulary rows.
    (b,) = list(ClickLogDataset(out / "test.tsv", s, sf.sizes(0), batch_size=8))
    assert b.labels.numel() == 2
    # A time split: the latest ratings are the test set, the next latest the validation set.
    timed = tmp_path / "timed"
    convert(str(timed), source=str(src), split="time", valid_fraction=0.25, test_fraction=0.25)
    assert sorted(r["timestamp"] for r in _read_tsv(timed / "test.tsv")) == ["700", "800"]
    assert sorted(r["timestamp"] for r in _read_tsv(timed / "valid.tsv")) == ["500", "600"]


def test_age_buckets() -> None:
    assert [age_bucket(a) for a in (7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)] == [
        "<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49",
        "50-55", "50-55", "56+", "56+"]


def test_bad_source_files_are_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_atomic(src)
    (src / "ml-100k.user").write_text("user_id:token\tage:token\n1\t24\n")
    with pytest.raises(DatasetUnavailableError, match=r"ml-100k\.user:1: expected the columns"):
        convert(str(tmp_path / "out"), source=str(src))
    with pytest.raises(DatasetUnavailableError, match=r"no ml-100k\.inter"):
        convert(str(tmp_path / "out"), source=str(tmp_path))
    full = tmp_path / "full"
    full.mkdir()
    (full / "train.tsv").write_text("x\n")
    with pytest.raises(DatasetUnavailableError, match=r"holds files but no meta\.json"):
        ensure_ml100k(str(full))


# ------------------------------------------------------------------ the real data
@pytest.fixture(scope="session")
def recbole_cache() -> str:
    """A cache directory holding RecBole's wheel (fetched with pip once, then reused)."""
    cache = os.environ.get("SHARK_TORCHREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "shark-torchrec")
    try:
        fetch_recbole_wheel(cache)
    except DatasetUnavailableError as e:
        pytest.skip(f"MovieLens-100K not available (pip could not fetch RecBole's wheel): {e}")
    return cache


@pytest.fixture(scope="session")
def ml100k_slice(recbole_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml100k_slice")
    convert(str(out), cache_dir=recbole_cache, max_ratings=SLICE)
    return out


def test_full_data_set_and_a_slice_match_a_direct_parse(recbole_cache, ml100k_slice) -> None:
    wheel = fetch_recbole_wheel(recbole_cache)
    # Independent reference: the wheel's files parsed here with zipfile and split().
    with zipfile.ZipFile(wheel) as z:
        def table(kind):
            text = z.read(f"recbole/dataset_example/ml-100k/ml-100k.{kind}").decode()
            return [line.split("\t") for line in text.splitlines()[1:] if line]
        inter, users = table("inter"), {r[0]: r for r in table("user")}
    t = read_atomic_files(wheel)
    assert {"ratings": len(t.ratings), "users": len(t.users), "items": len(t.items)} == FULL_COUNTS
    assert sum(float(r[2]) >= 4 for r in inter) == 55_375
    meta = json.loads((ml100k_slice / "meta.json").read_text())
    assert {k: v["rows"] for k, v in meta["splits"].items()} == {"train": 2400, "valid": 300, "test": 300}
    rows = [r for n in ("train", "valid", "test") for r in _read_tsv(ml100k_slice / f"{n}.tsv")]
    ratings = {(r[0], r[1], r[3]): r[2] for r in inter}
    for r in rows:
        stars = ratings[(r["user_id"], r["item_id"], r["timestamp"])]
        assert r["rating"] == stars and r["label"] == str(int(float(stars) >= 4))
        assert [r["age"], r["gender"], r["occupation"], r["zip_code"]] == users[r["user_id"]][1:]
    assert len({(r["user_id"], r["item_id"]) for r in rows}) == SLICE  # no rating twice
    # Every value is in its vocabulary (no row of the "other values" kind is used).
    sf = load_schema_file(str(ml100k_slice / "schema.yaml"))
    sizes = sf.sizes(0)
    for b in ClickLogDataset([ml100k_slice / "train.tsv", ml100k_slice / "test.tsv"], sf.schema, sizes, 1000):
        for name, n in zip(sf.schema.sparse_feature_names, sizes):
            values = b.sparse_features[name].values()
            assert values.numel() == 0 or int(values.max()) < n - (name not in ("user_id", "item_id"))


def test_conversion_is_deterministic_and_automatic(recbole_cache, ml100k_slice, tmp_path) -> None:
    again = tmp_path / "again"
    convert(str(again), cache_dir=recbole_cache, max_ratings=SLICE)
    for name in ("train.tsv", "valid.tsv", "test.tsv", "schema.yaml"):
        assert (again / name).read_bytes() == (ml100k_slice / name).read_bytes(), name
    # --data ml100k with an empty (or new) --data_path converts all of it there.
    auto = tmp_path / "auto"
    assert ensure_ml100k(str(auto), cache_dir=recbole_cache) == str(auto)
    meta = json.loads((auto / "meta.json").read_text())
    assert {k: v["rows"] for k, v in meta["splits"].items()} == {"train": 80000, "valid": 10000, "test": 10000}


@pytest.mark.slow
def test_shark_recipe_on_an_ml100k_slice(ml100k_slice, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "shark_dlrm.py"), "--data", "ml100k", "--data_path",
         str(ml100k_slice), "--batch_size", "64", "--embedding_dim", "8", "--dense_arch_layer_sizes", "16,8",
         "--over_arch_layer_sizes", "16,1", "--keep_fields", "6", "--quant_budget_fraction", "0.5",
         "--row_alignment", "1", "--log_level", "WARNING", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["quantized"]["examples"] == 300  # all of test.tsv
    assert report["plan"]["fields_before"] == 8 and report["plan"]["fields_after"] == 6
    assert report["stages"]["trained"]["auc"] > 0.6, report["stages"]
    # --row_alignment 1 (CPU serving): the export keeps the unpadded layout.
    model, info = load_export(str(out / "model"))
    mixed = [m for m in model.modules() if isinstance(m, RowwiseMixedEmbeddingBagCollection)]
    assert info["row_alignment"] == 1 and mixed and all(m.layout.row_alignment == 1 for m in mixed)
