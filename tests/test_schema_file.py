"""Schema files (`--data csv --schema FILE`): the worked example parses to hand-computed rows,
YAML and JSON agree, bad schemas name file, line and key path, the seeded line split, and
recipes/shark_dlrm.py end to end on a CSV laid out by a schema file."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from shark_torchrec.data import ClickLogDataset, LineSplit, SchemaFileError, load_schema_file
from shark_torchrec.errors import FlagError, SharkInputError
from shark_torchrec.training.datasets import require_rows
from shark_torchrec.cli_run import parse_train
from shark_torchrec.training.train_dlrm import data_spec_from

EXAMPLE_SCHEMA = ROOT / "examples" / "click_log_schema.yaml"
EXAMPLE_LOG = ROOT / "examples" / "click_log.csv"


def _h(value: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % n


def test_worked_example_reads_to_hand_computed_rows() -> None:
    sf = load_schema_file(str(EXAMPLE_SCHEMA))
    assert sf.schema.sparse_feature_names == ["user", "item", "country", "tags"]
    assert sf.sizes(7) == [1000, 50000, 4, 100]  # country: 3 values + 1 row for the others
    (b,) = list(ClickLogDataset(EXAMPLE_LOG, sf.schema, sf.sizes(7), batch_size=8))
    assert b.labels.tolist() == [1, 0, 0, 1]
    assert b.dense_features[:, 0].tolist() == pytest.approx([math.log1p(9.5), 0.0, math.log1p(3), math.log1p(12)])
    kjt = b.sparse_features
    assert kjt["user"].values().tolist() == [_h("u1", 1000), _h("u2", 1000), _h("u1", 1000), _h("u3", 1000)]
    assert kjt["item"].values().tolist() == [42, 7, 1, 42]  # 50001 % 50000
    assert kjt["country"].values().tolist() == [0, 1, 3, 2]  # br is not in the vocabulary
    assert kjt["tags"].lengths().tolist() == [2, 0, 1, 1]
    assert kjt["tags"].values().tolist() == [_h("sport", 100), _h("news", 100), _h("news", 100), _h("sport", 100)]


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_before_the_header_is_not_part_of_the_first_column(tmp_path: Path, gz: bool) -> None:
    """Spreadsheet exports start with a UTF-8 BOM; it used to make the first column "not there"."""
    import gzip

    sf = load_schema_file(str(EXAMPLE_SCHEMA))
    # the label first, so that the BOM would stick to a column the schema needs
    lines = [line.split(",", 2) for line in EXAMPLE_LOG.read_text().splitlines()]
    text = "\n".join(",".join([b, a, rest]) for a, b, rest in lines) + "\n"
    assert text.startswith("clicked,ts,")
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / ("bom.csv.gz" if gz else "bom.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    (a,) = list(ClickLogDataset(EXAMPLE_LOG, sf.schema, sf.sizes(7), batch_size=8))
    (b,) = list(ClickLogDataset(path, sf.schema, sf.sizes(7), batch_size=8))
    assert b.labels.tolist() == a.labels.tolist()
    assert b.sparse_features.values().tolist() == a.sparse_features.values().tolist()
    assert b.dense_features.tolist() == a.dense_features.tolist()


def test_json_schema_equals_yaml_and_vocabulary_values_are_text(tmp_path: Path) -> None:
    doc = yaml.safe_load(EXAMPLE_SCHEMA.read_text())
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc, indent=1))
    a, b = load_schema_file(str(EXAMPLE_SCHEMA)), load_schema_file(str(path))
    assert a.schema == b.schema and a.num_embeddings == b.num_embeddings
    # YAML would read 01 as 1 and no as False: vocabulary values are compared as written.
    y = tmp_path / "v.yaml"
    y.write_text("label: c\ncategorical:\n  zip: {vocabulary: [01, no, '7']}\n")
    assert load_schema_file(str(y)).schema.vocabularies["zip"] == ["01", "no", "7"]
    # Headerless files: the column order comes from `columns`.
    y.write_text("label: c\nheader: false\ndelimiter: tab\ncolumns: [c, x, y]\ncategorical: [y]\n")
    s = load_schema_file(str(y)).schema
    assert s.has_header is False and s.delimiter == "\t" and s.column_names == ["c", "x", "y"]
    assert load_schema_file(str(y)).num_embeddings == (None,)


BAD_SCHEMAS = [
    # (file text, the error's text after "FILE:")
    ("label: c\ncategorical:\n  item: {encoding: decimal}\n",
     "3: categorical.item.encoding: expected one of hash, hex, int, got 'decimal'"),
    ("label: c\ncategorical: [a]\nmulti_valued:\n  tags: {num_embeddings: 5}\n",
     "4: multi_valued.tags.separator: missing (required"),
    ("label: c\ncategorical:\n  a: 0\n", "3: categorical.a.num_embeddings: expected a positive integer"),
    ("label: c\ncategorical:\n  a: {rows: 5}\n", "3: categorical.a.rows: unknown key (known: num_embeddings, encoding, vocabulary)"),
    ("label: c\ncategroical: [a]\n", "2: categroical: unknown key"),
    ("categorical: [a]\n", "label: missing (required)"),
    ("label: c\ncategorical: [a]\ncategorical: [b]\n", "3: categorical: key given twice"),
    ("label: c\ndense: [a]\ncategorical: [a]\n", "3: categorical[0]: column 'a' is already used by dense[0]"),
    ("label: c\ncategorical:\n  a: {vocabulary: [x, y, x]}\n", "3: categorical.a.vocabulary[2]: value 'x' listed twice"),
    ("label: c\ncategorical:\n  a: {vocabulary: [x, y], num_embeddings: 2}\n",
     "3: categorical.a.num_embeddings: 2 rows for a vocabulary of 2 values: at least 3"),
    ("label: c\nheader: false\ncategorical: [a]\n", "columns: needed with header: false"),
    ("label: c\nheader: false\ncolumns: [c, b]\ncategorical: [a]\n",
     "3: columns: does not list the columns ['a'] that the schema uses"),
    ("label: c\ndelimiter: '|'\ncategorical: [a]\nmulti_valued:\n  t: {separator: '|'}\n",
     "5: multi_valued.t.separator: '|' is also the column delimiter"),
    ("label: c\ncategorical: [a\n", "not valid YAML"),
    ("# nothing\n", "top level: the schema file is empty"),
    ("- label\n", "top level: expected a mapping of schema keys"),
]


@pytest.mark.parametrize("text,message", BAD_SCHEMAS)
def test_bad_schema_names_file_line_and_key_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaFileError) as e:
        load_schema_file(str(path))
    assert str(e.value).startswith(f"{path}:"), str(e.value)
    assert message in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, SharkInputError)


def test_bad_json_schema_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"label": "c",\n "categorical": {"a": {"num_embeddings": -1}}}\n')
    with pytest.raises(SchemaFileError, match=r"s\.json:2: categorical\.a\.num_embeddings: expected a positive"):
        load_schema_file(str(path))
    path.write_text('{"label": "c",\n "categorical": ["a",]}\n')
    with pytest.raises(SchemaFileError, match=r"s\.json:2: not valid JSON"):
        load_schema_file(str(path))


# ------------------------------------------------------------------ the seeded line split
def test_line_split_is_seeded_hash_of_file_name_and_line() -> None:
    split = LineSplit(valid_fraction=0.1, test_fraction=0.2, seed=3)
    names = [split.split_of("/any/dir/log.csv", n) for n in range(1, 5001)]
    # Reference: the documented rule, computed here directly.
    for n in (1, 2, 77, 4999):
        u = int.from_bytes(hashlib.blake2b(f"3\0log.csv\0{n}".encode(), digest_size=8).digest(), "little") / 2 ** 64
        assert names[n - 1] == ("test" if u < 0.2 else "dev" if u < 0.3 else "train")
    assert names == [split.split_of("elsewhere/log.csv", n) for n in range(1, 5001)]  # directory-free
    counts = {s: names.count(s) for s in ("train", "dev", "test")}
    assert abs(counts["test"] - 1000) < 120 and abs(counts["dev"] - 500) < 90  # ~4 standard deviations
    other = [LineSplit(0.1, 0.2, seed=4).split_of("log.csv", n) for n in range(1, 5001)]
    assert other != names
    with pytest.raises(ValueError, match="leaves no training lines"):
        LineSplit(0.5, 0.5)


def _write_log(path: Path, rows: int, seed: int = 0) -> None:
    """A click log in the example's layout, with a learnable signal in `item` and `tags`."""
    import random

    rng = random.Random(seed)
    lines = ["ts,clicked,user,item,price,country,tags"]
    for i in range(rows):
        item = rng.randrange(60)
        tags = "|".join(rng.sample(["sport", "news", "music", "tech", "food"], rng.randrange(3)))
        p = 0.8 if item < 20 or "sport" in tags else 0.2
        lines.append(f"t{i},{int(rng.random() < p)},u{rng.randrange(200)},{item},{rng.random() * 20:.2f},"
                     f"{rng.choice(['de', 'fr', 'us', 'br'])},{tags}")
    path.write_text("\n".join(lines) + "\n")


def test_csv_flags_give_disjoint_splits_of_one_file(tmp_path: Path) -> None:
    log = tmp_path / "all.csv"
    _write_log(log, 400)
    run = parse_train(["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files", str(log),
                                      "--valid_fraction", "0.1", "--test_fraction", "0.2", "--num_embeddings", "9",
                                      "--batch_size", "64"])
    spec = data_spec_from(run.data)
    assert spec.feature_names == ["user", "item", "country", "tags"]
    assert spec.num_embeddings_per_feature == [1000, 50000, 4, 100] and spec.num_dense == 1
    assert spec.files("test") == spec.files("dev") == [str(log)]

    def rows(split):
        return [tuple(r) for b in spec.dataset(split, 1, 0, 1)  # train drops a partial batch
                for r in zip(b.labels.tolist(), b.dense_features[:, 0].tolist())]

    parts = {s: rows(s) for s in ("train", "dev", "test")}
    assert sum(len(p) for p in parts.values()) == 400
    # Reference: the split rule applied to the file's line numbers (2..401).
    want = {s: sum(LineSplit(0.1, 0.2, 0).split_of(str(log), n) == s for n in range(2, 402))
            for s in ("train", "dev", "test")}
    assert {s: len(p) for s, p in parts.items()} == want
    assert spec.train_batches(50) == want["train"] // 50
    require_rows(spec, run.training.batch_size, world_size=2)


@pytest.mark.parametrize("argv,message", [
    (["--data", "csv", "--train_files", "X"], "--data csv needs --schema FILE"),
    (["--data", "synthetic", "--test_fraction", "0.1"], "--test_fraction: for click-log files"),
    (["--data", "criteo", "--schema", str(EXAMPLE_SCHEMA), "--train_files", "X"], "--schema is for --data csv"),
    (["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files", str(EXAMPLE_LOG),
      "--test_files", str(EXAMPLE_LOG), "--test_fraction", "0.2"], "--test_fraction and --test_files both"),
    (["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files", str(EXAMPLE_LOG),
      "--test_fraction", "0.5", "--valid_fraction", "0.5"], "leave no training lines"),
    (["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files", str(EXAMPLE_LOG)],
     "--data csv needs --data_path or --test_files (or --test_fraction"),
    (["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files", str(EXAMPLE_LOG), "--test_fraction",
      "0.2", "--num_embeddings_per_feature", "10,10,3,10"], "feature 'country' has a vocabulary of 3 values"),
])
def test_csv_flag_errors(argv, message) -> None:
    with pytest.raises(FlagError) as e:
        data_spec_from(parse_train(argv).data)
    assert message in str(e.value)


@pytest.mark.slow
def test_shark_recipe_on_a_csv_with_a_schema_file(tmp_path: Path) -> None:
    log = tmp_path / "clicks.csv"
    _write_log(log, 1600)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "shark_dlrm.py"), "--data", "csv", "--schema", str(EXAMPLE_SCHEMA),
         "--train_files", str(log), "--test_fraction", "0.25", "--batch_size", "64", "--embedding_dim", "8",
         "--dense_arch_layer_sizes", "16,8", "--over_arch_layer_sizes", "16,1", "--keep_fields", "2",
         "--quant_budget_fraction", "0.5", "--epochs", "2", "--log_level", "WARNING", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    n_test = sum(LineSplit(0, 0.25, 0).split_of(str(log), n) == "test" for n in range(2, 1602))
    assert stages["quantized"]["examples"] == n_test
    assert report["plan"]["fields_after"] == 2
    assert sorted(report["plan"]["dropped_features"]) == ["country", "user"]  # the two without signal
    assert stages["trained"]["auc"] > 0.65, stages  # the planted signal is learnt


def test_bad_schema_stops_the_recipe_naming_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("label: clicked\ncategorical:\n  user: {encoding: decimal}\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train_dlrm.py"), "--data", "csv", "--schema", str(bad),
         "--train_files", str(EXAMPLE_LOG), "--test_fraction", "0.5", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert f"{bad}:3: categorical.user.encoding: expected one of hash, hex, int, got 'decimal'" in proc.stderr


@pytest.mark.parametrize("argv", [["--data", "synthetic", "--synthetic_num_fields", "3", "--synthetic_informative", "1", "--synthetic_cardinality",
                                   "50", "--synthetic_test_batches", "2"],
                                  ["--data", "csv", "--schema", str(EXAMPLE_SCHEMA), "--train_files",
                                   str(EXAMPLE_LOG), "--test_files", str(EXAMPLE_LOG)]])
def test_hashed_tables_take_each_id_modulo_their_rows(argv) -> None:
    """--hash_rows_fraction: the smaller hashed tables of the frontier's baseline, for generated
    data and click logs (vocabulary features included)."""
    plain = data_spec_from(parse_train(argv).data)
    hashed = data_spec_from(parse_train([*argv, "--hash_rows_fraction", "0.1"]).data)
    assert hashed.model_rows == [max(1, math.ceil(0.1 * n)) for n in plain.num_embeddings_per_feature]
    assert plain.model_rows == plain.num_embeddings_per_feature
    a = list(plain.batches(plain.dataset("test", 4, 0, 1)))
    b = list(hashed.batches(hashed.dataset("test", 4, 0, 1)))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k, rows in zip(plain.feature_names, hashed.model_rows):
            assert y.sparse_features[k].values().tolist() == [v % rows for v in x.sparse_features[k].values().tolist()]
            assert y.sparse_features[k].lengths().tolist() == x.sparse_features[k].lengths().tolist()
        assert torch.equal(x.labels, y.labels) and torch.equal(x.dense_features, y.dense_features)
    assert any(max(b_.sparse_features.values().tolist() or [0]) < max(a_.sparse_features.values().tolist() or [0])
               for a_, b_ in zip(a, b))  # the hashing changed some ids
