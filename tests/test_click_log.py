"""Click-log readers: real samples, hand-written files, malformed input, rank/worker splits."""

import csv
import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file
from shark_torchrec.data import (
    AVAZU_SCHEMA,
    CRITEO_SCHEMA,
    ClickLogDataset,
    ClickLogSchema,
    MalformedLineError,
    avazu_dataset,
    criteo_dataset,
    make_dataloader,
)


def _rows(batches):
    """Flatten batches into per-example (label, dense, {feature: ids})."""
    out = []
    for b in batches:
        kjt = {k: jt.to_dense() for k, jt in b.sparse_features.to_dict().items()}
        for i in range(b.labels.shape[0]):
            feats = {k: bags[i].tolist() for k, bags in kjt.items()}
            out.append((float(b.labels[i]), b.dense_features[i].tolist(), feats))
    return out


def _criteo_line(label=1, dense=None, cats=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([str(label), *dense, *cats])


# ------------------------------------------------------------------ real samples
def test_criteo_kaggle_sample_reads_every_row_exactly() -> None:
    path = shared_file("criteo_kaggle_sample", "train.tsv")
    n_emb = 1000
    ds = criteo_dataset(path, n_emb, batch_size=500)
    rows = _rows(ds)
    # Independent reference: the csv module and the formulas of the layout.
    with open(path, newline="") as f:
        ref = list(csv.reader(f, delimiter="\t"))
    assert len(rows) == len(ref) == 7200
    for (label, dense, feats), line in zip(rows[:300], ref[:300]):
        assert label == int(line[0])
        want_dense = [math.log1p(max(float(x), 0.0)) if x else 0.0 for x in line[1:14]]
        np.testing.assert_allclose(dense, want_dense, rtol=1e-6)
        want = [int(x or "0", 16) % n_emb for x in line[14:]]
        assert [feats[f"cat_{i}"][0] for i in range(26)] == want
    positive_rate = np.mean([r[0] for r in rows])
    assert positive_rate == pytest.approx(np.mean([int(line[0]) for line in ref]))


def test_criteo_1tb_gzip_sample() -> None:
    path = shared_file("criteo_1tb_sample", "day_0.gz")
    rows = _rows(criteo_dataset(path, [10 ** 6] * 26, batch_size=128))
    with gzip.open(path, "rt") as f:
        ref = [line.rstrip("\n").split("\t") for line in f]
    assert len(rows) == len(ref) == 1000
    assert [r[0] for r in rows] == [float(x[0]) for x in ref]
    assert rows[7][2]["cat_3"] == [int(ref[7][17] or "0", 16) % 10 ** 6]


def test_avazu_sample_with_header_preset() -> None:
    path = shared_file("avazu_sample", "train.csv")
    ds = avazu_dataset(path, 5000, batch_size=1000)
    batches = list(ds)
    assert sum(b.labels.numel() for b in batches) == 8087
    assert batches[0].dense_features.shape == (1000, 0)
    assert batches[0].sparse_features.keys() == AVAZU_SCHEMA.sparse_feature_names
    assert len(AVAZU_SCHEMA.categorical) == 22
    with open(path, newline="") as f:
        first = next(csv.DictReader(f))
    h = int.from_bytes(hashlib.blake2b(first["site_id"].encode(), digest_size=8).digest(), "little")
    assert batches[0].sparse_features["site_id"].to_dense()[0].tolist() == [h % 5000]
    assert batches[0].labels[0].item() == float(first["click"])
    # The sample's test.csv has no header line: the preset detects that.
    test = shared_file("avazu_sample", "test.csv")
    rows = _rows(avazu_dataset(test, 5000, batch_size=100))
    with open(test, newline="") as f:
        ref = list(csv.reader(f))
    assert len(rows) == len(ref) == 432
    assert [r[0] for r in rows] == [float(x[1]) for x in ref]


# ------------------------------------------------------------------ small files
def test_plain_and_gzip_give_the_same_batches(tmp_path: Path) -> None:
    lines = [_criteo_line(i % 2, cats=[f"{(i * 31 + j):x}" for j in range(26)]) for i in range(50)]
    plain = tmp_path / "day_0"
    plain.write_text("\n".join(lines) + "\n")
    gz = tmp_path / "day_0.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines) + "\n")
    a, b = _rows(criteo_dataset(plain, 97, 16)), _rows(criteo_dataset(gz, 97, 16))
    assert a == b and len(a) == 50


def test_missing_values(tmp_path: Path) -> None:
    dense = ["" if i == 2 else "-5" if i == 3 else "3" for i in range(13)]
    cats = ["" if j == 4 else "ff" for j in range(26)]
    path = tmp_path / "t.tsv"
    path.write_text(_criteo_line(0, dense, cats) + "\n")
    (label, d, feats), = _rows(criteo_dataset(path, 100, 4))
    assert d[2] == 0.0 and d[3] == 0.0 and d[0] == pytest.approx(math.log1p(3))
    assert feats["cat_4"] == [0] and feats["cat_0"] == [255 % 100]
    import dataclasses
    empty_schema = dataclasses.replace(CRITEO_SCHEMA, missing_as_empty=True)
    (_, _, feats2), = _rows(ClickLogDataset(path, empty_schema, 100, 4))
    assert feats2["cat_4"] == [] and feats2["cat_0"] == [55]


def test_schema_driven_reader_with_multi_valued_column(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user;clicked;age;tags;city\n"
                    "u1;1;30;a|b|c;paris\n"
                    "u2;0;;;berlin\n"
                    "u3;0;7.5;b;\n")
    schema = ClickLogSchema(label="clicked", dense=["age"], categorical=["user", "city"],
                            multi_valued={"tags": "|"}, delimiter=";", dense_transform="none")
    ds = ClickLogDataset(path, schema, {"user": 10, "city": 10, "tags": 1000}, batch_size=8)
    (b,) = list(ds)
    assert b.sparse_features.keys() == ["user", "city", "tags"]
    assert b.dense_features[:, 0].tolist() == [30.0, 0.0, 7.5]
    tags = b.sparse_features["tags"]
    assert tags.lengths().tolist() == [3, 0, 1]

    def h(v, n):
        return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % n

    assert tags.values().tolist() == [h("a", 1000), h("b", 1000), h("c", 1000), h("b", 1000)]
    assert b.sparse_features["city"].values().tolist() == [h("paris", 10), h("berlin", 10), h("0", 10)]


def test_schema_naming_a_missing_column_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("click,a,b\n1,x,y\n")
    schema = ClickLogSchema(label="click", dense=[], categorical=["a", "nope"])
    with pytest.raises(ValueError, match=r"log\.csv.*not there: \['nope'\]"):
        ClickLogDataset(path, schema, 10, 4)


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    good = _criteo_line()
    short = "\t".join(good.split("\t")[:-1])
    bad_dense = _criteo_line(dense=["1"] * 5 + ["x7"] + ["1"] * 7)
    path = tmp_path / "train.tsv"
    path.write_text("\n".join([good, good, short, good, bad_dense, good]) + "\n")
    with pytest.raises(MalformedLineError, match=r"train\.tsv:3: expected 40 columns .* got 39"):
        list(criteo_dataset(path, 10, 2))
    path.write_text("\n".join([good, bad_dense]) + "\n")
    with pytest.raises(MalformedLineError, match=r"train\.tsv:2: dense column 'int_5' is not numeric: 'x7'"):
        list(criteo_dataset(path, 10, 2))
    path.write_text("\n".join([good, _criteo_line(label=2)]) + "\n")
    with pytest.raises(MalformedLineError, match=r"train\.tsv:2: label column 'label' must be 0 or 1"):
        list(criteo_dataset(path, 10, 2))
    path.write_text("\n".join([good, _criteo_line(cats=["zz"] * 26)]) + "\n")
    with pytest.raises(MalformedLineError, match=r"train\.tsv:2: column 'cat_0' is not hexadecimal"):
        list(criteo_dataset(path, 10, 2))


def test_header_line_numbers_count_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("click,x\n1,a\n0\n")
    schema = ClickLogSchema(label="click", dense=[], categorical=["x"])
    with pytest.raises(MalformedLineError, match=r"a\.csv:3: expected 2 columns"):
        list(ClickLogDataset(path, schema, 10, 4))


def test_skip_malformed_counts_and_reports(tmp_path: Path, caplog) -> None:
    good = _criteo_line()
    lines = [good, "garbage", good, _criteo_line(dense=["?"] * 13), good]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    ds = criteo_dataset(path, 10, 10, skip_malformed=True)
    with caplog.at_level("WARNING"):
        rows = _rows(ds)
    assert len(rows) == 3
    assert ds.malformed.count == 2
    assert ds.malformed.examples[0].startswith(f"{path}:2:")
    assert "skipped 2 malformed lines" in caplog.text


# ------------------------------------------------------------------ splitting
def _kaggle_or_tmp(tmp_path: Path) -> Path:
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(
        _criteo_line(i % 2, dense=[str(i)] * 13, cats=[f"{i * 7 + j:x}" for j in range(26)])
        for i in range(203)) + "\n")
    return path


def test_rank_slices_reassemble_the_global_batches(tmp_path: Path) -> None:
    path = _kaggle_or_tmp(tmp_path)  # 203 lines: 5 global batches of 40, then 3 lines
    whole = list(criteo_dataset(path, 50, 40))
    assert len(whole) == 6
    per_rank = [list(criteo_dataset(path, 50, 20, rank=r, world_size=2)) for r in range(2)]
    assert all(len(p) == 6 for p in per_rank)
    for g, ref in enumerate(whole):
        assert _rows([p[g] for p in per_rank]) == _rows([ref])
    # The final partial global batch (3 lines) is split as evenly as possible...
    assert [p[-1].labels.numel() for p in per_rank] == [1, 2]
    # ...and final lines fewer than the ranks (3 for 4) ride with the batch before them: every
    # line is read once (ranks stay in step: 5 batches each, the last 43 lines split 10/11/11/11)
    four = [list(criteo_dataset(path, 50, 10, rank=r, world_size=4)) for r in range(4)]
    assert [len(p) for p in four] == [5, 5, 5, 5]
    assert _rows([p[0] for p in four]) == _rows([whole[0]])
    assert [p[-1].labels.numel() for p in four] == [10, 11, 11, 11]
    assert _rows([b for g in range(5) for b in (p[g] for p in four)]) == _rows(whole)
    assert len(list(criteo_dataset(path, 50, 20, rank=1, world_size=2, drop_last=True))) == 5
    # (resumed or cut at a batch, the same batches)
    assert _rows(criteo_dataset(path, 50, 10, rank=3, world_size=4, start_batch=4)) == _rows([four[3][-1]])
    assert [len(list(criteo_dataset(path, 50, 10, rank=r, world_size=4, max_batches=5))) for r in range(4)] == [5] * 4


def test_workers_preserve_batch_order_and_resume_skips(tmp_path: Path) -> None:
    path = _kaggle_or_tmp(tmp_path)
    ref = _rows(criteo_dataset(path, 50, 16))
    for workers in (2, 3):
        got = _rows(make_dataloader(criteo_dataset(path, 50, 16), num_workers=workers))
        assert got == ref
    resumed = _rows(make_dataloader(criteo_dataset(path, 50, 16, start_batch=5), num_workers=2))
    assert resumed == ref[5 * 16:]


def test_int32_ids(tmp_path: Path) -> None:
    path = _kaggle_or_tmp(tmp_path)
    with pytest.raises(ValueError, match=r"feature 'cat_0' has ids up to 4294967295, past int32's"):
        criteo_dataset(path, 2 ** 32, 16, id_dtype=torch.int32)  # (they would wrap to negative ids)
    b32 = next(iter(criteo_dataset(path, 50, 16, id_dtype=torch.int32)))
    b64 = next(iter(criteo_dataset(path, 50, 16)))
    assert b32.sparse_features.values().dtype == torch.int32
    assert b32.sparse_features.values().tolist() == b64.sparse_features.values().tolist()


def test_reader_streams_with_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    def peak(n_lines: int) -> int:
        path = tmp_path / f"big_{n_lines}.tsv"
        with open(path, "w") as f:
            for i in range(n_lines):
                f.write(_criteo_line(i % 2, cats=[f"{i:x}"] * 26) + "\n")
        tracemalloc.start()
        for _ in criteo_dataset(path, 1000, 256):
            pass
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small, big = peak(1_000), peak(10_000)
    assert big < 1.5 * small  # 10x the lines, not 10x the memory


# ------------------------------------------------------------------ encodings per column
def test_int_and_vocabulary_encodings(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    path.write_text("label\tuser\tcity\tcolour\n"
                    "1\t7\tparis\tred\n"
                    "0\t12\tlyon\tblue\n"
                    "1\t3\t\tred\n")
    schema = ClickLogSchema(label="label", dense=[], categorical=["user", "city", "colour"],
                            delimiter="\t", encodings={"user": "int"},
                            vocabularies={"city": ["paris", "berlin"]})
    (b,) = list(ClickLogDataset(path, schema, {"user": 10, "city": 3, "colour": 50}, batch_size=8))
    kjt = b.sparse_features
    assert kjt["user"].values().tolist() == [7, 12 % 10, 3]
    # paris is row 0; lyon (not listed) and the missing value ("0") share the extra row 2.
    assert kjt["city"].values().tolist() == [0, 2, 2]
    h = [int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % 50
         for v in ("red", "blue", "red")]
    assert kjt["colour"].values().tolist() == h


def test_int_encoding_rejects_non_integers_and_small_vocabulary_tables(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("click,user\n1,7\n0,7.5\n")
    schema = ClickLogSchema(label="click", dense=[], categorical=["user"], categorical_encoding="int")
    with pytest.raises(MalformedLineError, match=r"log\.csv:3: column 'user' is not a decimal integer: '7\.5'"):
        list(ClickLogDataset(path, schema, 10, 4))
    # a negative id would wrap onto a real one (-1 -> row 9 of 10, the row of id 9)
    path.write_text("click,user\n1,9\n0,-1\n1,-0\n")
    with pytest.raises(MalformedLineError, match=r"log\.csv:3: column 'user' holds a negative id '-1'"):
        list(ClickLogDataset(path, schema, 10, 4))
    # a column named twice in the header: which one was meant?
    path.write_text("click,user,user\n1,7,8\n")
    with pytest.raises(MalformedLineError, match=r"log\.csv:1 \(the header line\): column 'user' appears more than once"):
        list(ClickLogDataset(path, schema, 10, 4))
    vocab = ClickLogSchema(label="click", dense=[], categorical=["user"], vocabularies={"user": ["7", "8"]})
    with pytest.raises(ValueError, match="vocabulary of 2 values, so it needs num_embeddings >= 3"):
        ClickLogDataset(path, vocab, 2, 4)
    with pytest.raises(ValueError, match="encodings\\['user'\\] must be one of"):
        ClickLogSchema(label="click", dense=[], categorical=["user"], encodings={"user": "octal"})


# ------------------------------------------------------------------ damaged files
def _gz_lines(n: int) -> bytes:
    return gzip.compress("".join(_criteo_line(i % 2, cats=[f"{i:x}"] * 26) + "\n"
                                 for i in range(n)).encode())


def test_truncated_gzip_names_the_file_and_the_last_line(tmp_path: Path) -> None:
    whole = _gz_lines(3000)
    path = tmp_path / "day_0.gz"
    path.write_bytes(whole[: len(whole) // 2])
    # Independent reference: the complete lines gzip hands out before it fails.
    complete = 0
    with gzip.open(path, "rt") as f:
        try:
            for line in f:
                complete += line.endswith("\n")
        except EOFError:
            pass
    assert 0 < complete < 3000
    with pytest.raises(MalformedLineError) as e:
        list(criteo_dataset(path, 100, 64))
    assert f"{path}: the compressed file is truncated: reading stopped after line {complete} " in str(e.value)
    # --skip_malformed: every complete line is read, the damage is counted once.
    ds = criteo_dataset(path, 100, 64, skip_malformed=True)
    assert len(_rows(ds)) == complete
    assert ds.malformed.count == 1 and "truncated" in ds.malformed.examples[0]
    assert ds.count_rows() == complete


def test_file_that_is_not_gzip_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv.gz"
    path.write_text(_criteo_line() + "\n")
    with pytest.raises(MalformedLineError, match=r"train\.tsv\.gz: the file cannot be read: reading "
                                                 r"stopped before its first line: BadGzipFile"):
        list(criteo_dataset(path, 100, 4))
    header = ClickLogSchema(label="click", dense=[], categorical=["x"])  # reads a header first
    with pytest.raises(MalformedLineError, match=r"train\.tsv\.gz: the file cannot be read"):
        ClickLogDataset(path, header, 10, 4)


def test_line_filter_keeps_only_the_chosen_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("click,x\n" + "".join(f"{i % 2},v{i}\n" for i in range(10)))
    schema = ClickLogSchema(label="click", dense=[], categorical=["x"])
    ds = ClickLogDataset(path, schema, 1000, 3, line_filter=lambda p, n: n % 3 == 0)
    # Line numbers count the header (line 1): lines 3, 6, 9 hold v1, v4, v7.
    ids = [v for b in ds for v in b.sparse_features["x"].values().tolist()]
    h = [int.from_bytes(hashlib.blake2b(f"v{i}".encode(), digest_size=8).digest(), "little") % 1000
         for i in (1, 4, 7)]
    assert ids == h and ds.count_rows() == 3 and ds.count_rows(limit=2) == 2
