"""MovieLens-100K as a click log: the converter behind ``--data ml100k``.

MovieLens-100K (GroupLens: 100,000 ratings 1-5 of 1,682 movies by 943 users, Sep 1997 - Apr
1998) is complete inside the PyPI wheel of RecBole (``recbole/dataset_example/ml-100k``, its
"atomic files"), so ``pip`` is all it takes to fetch it.  This module turns it into
tab-separated click logs and the schema file that reads them::

    python -m shark_torchrec.data.movielens --out data/ml100k     # fetches the wheel with pip
    python recipes/train_dlrm.py --data ml100k --data_path data/ml100k
    python recipes/train_dlrm.py --data ml100k     # converts into ~/.cache/shark-torchrec/ml-100k

Output (``--out``): ``train.tsv``, ``valid.tsv``, ``test.tsv`` (with a header line),
``schema.yaml`` (see :mod:`shark_torchrec.data.schema_file`) and ``meta.json`` (source,
split, row counts, positive rates).  The data is never part of the repository: the wheel is
cached in ``--cache_dir`` (default ``~/.cache/shark-torchrec``, or ``$SHARK_TORCHREC_CACHE``).

One row per rating.  The label is ``rating >= 4`` (55.4% of the ratings).  Features:

* dense: ``age`` (log1p);
* single-valued: ``user_id`` and ``item_id`` (their own ids, one row each), ``age_bucket``
  (MovieLens-1M's groups: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender``,
  ``occupation``, ``zip_code``, ``release_year`` (from the item's release date; the year in
  the title where the date is unknown, missing (an empty bag) where both are);
* multi-valued: ``genres`` (1-6 of 19, ``|``-separated).

Vocabularies come from the user and item tables, not from the ratings, so they are the same
for every split and slice and leak nothing of the test ratings.  ``rating`` and ``timestamp``
are kept as columns for reference; the schema does not use them (``rating`` is the label's
source).

**The split.**  The default, ``--split random``, draws 80/10/10% of the ratings at random
(seeded), as RecBole's default protocol does.  ``--split time`` cuts by time instead (the
last 10% of the ratings are the test set), which is how a production model meets the future;
but MovieLens users rated in bursts shortly after joining, so a time cut mostly puts *new*
users in the test set (86% of the last 10% of ratings come from users with no rating in the
first 80%): the task becomes cold-start prediction, in which the user table — the largest
one, and the one compression is about — cannot matter.  Either way the training rows are
shuffled (seeded): the readers stream files in order, and minibatch training wants them
mixed.  ``--max_ratings N`` converts a seeded random sample of N ratings (tests use a slice).
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from shark_torchrec.data.schema_file import write_schema_file
from shark_torchrec.errors import SharkInputError

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
#: The atomic files' headers (RecBole's ``field:type`` names).
_HEADERS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "user": ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
    "item": ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
}
#: The full data set, for the check that nothing was lost on the way.
FULL_COUNTS = {"ratings": 100_000, "users": 943, "items": 1_682}
AGE_BUCKETS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
COLUMNS = ["label", "user_id", "item_id", "age", "age_bucket", "gender", "occupation", "zip_code",
           "release_year", "genres", "rating", "timestamp"]
SPLIT_FILES = {"train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv"}
SCHEMA_FILE = "schema.yaml"
META_FILE = "meta.json"
GENRE_SEPARATOR = "|"


class DatasetUnavailableError(SharkInputError, RuntimeError):
    """The data set could not be fetched or read; the message says from where and why."""


def default_cache_dir() -> str:
    """``$SHARK_TORCHREC_CACHE``, else ``~/.cache/shark-torchrec``."""
    return os.environ.get("SHARK_TORCHREC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shark-torchrec")


def age_bucket(age: int) -> str:
    """MovieLens-1M's age group of ``age``."""
    for upper, name in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                        (56, "50-55")):
        if age < upper:
            return name
    return "56+"


def release_year(year_text: str, title: str) -> str:
    """The release year: the item's own year, else a ``(YYYY)`` in the title, else ``""``."""
    if re.fullmatch(r"\d{4}", year_text):
        return year_text
    found = re.findall(r"\((\d{4})\)", title)
    return found[-1] if found else ""


# ---------------------------------------------------------------------------------- fetching
def fetch_recbole_wheel(cache_dir: Optional[str] = None) -> str:
    """The path of RecBole's wheel in ``cache_dir/wheels``, downloaded with pip if absent."""
    wheels = os.path.join(cache_dir or default_cache_dir(), "wheels")
    pattern = os.path.join(wheels, f"recbole-{RECBOLE_VERSION}-*.whl")
    found = sorted(glob.glob(pattern))
    if found:
        return found[0]
    os.makedirs(wheels, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"recbole=={RECBOLE_VERSION}", "-d", wheels]
    logger.info("fetching MovieLens-100K: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DatasetUnavailableError(f"cannot run pip to fetch recbole=={RECBOLE_VERSION}: {e}") from e
    found = sorted(glob.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DatasetUnavailableError(
            f"pip could not download recbole=={RECBOLE_VERSION} (which holds MovieLens-100K) into "
            f"{wheels}: {tail or f'exit status {proc.returncode}'}; download it elsewhere "
            f"(`pip download --no-deps recbole=={RECBOLE_VERSION}`) and pass it with --source"
        )
    return found[0]


@dataclass
class _Tables:
    ratings: List[List[str]]
    users: Dict[str, List[str]]
    items: Dict[str, List[str]]


def read_atomic_files(source: str) -> _Tables:
    """Ratings, users and items from RecBole's wheel (a ``.whl``) or a directory holding
    ``ml-100k.inter``, ``ml-100k.user`` and ``ml-100k.item``."""
    tables = {}
    for kind in ("inter", "user", "item"):
        if os.path.isdir(source):
            name = os.path.join(source, f"ml-100k.{kind}")
            if not os.path.isfile(name):
                raise DatasetUnavailableError(f"{source}: no ml-100k.{kind} (expected RecBole's "
                                              f"ml-100k atomic files)")
            with open(name, "rb") as f:
                raw = f.read()
        else:
            name = f"{source}!{_MEMBER.format(kind)}"
            try:
                with zipfile.ZipFile(source) as z:
                    raw = z.read(_MEMBER.format(kind))
            except (OSError, zipfile.BadZipFile, KeyError) as e:
                raise DatasetUnavailableError(f"{source}: cannot read {_MEMBER.format(kind)} ({e})") from e
        tables[kind] = _rows(raw, name, kind)
    users = {r[0]: r for r in tables["user"]}
    items = {r[0]: r for r in tables["item"]}
    for kind, table, index in (("user", users, tables["user"]), ("item", items, tables["item"])):
        if len(table) != len(index):
            raise DatasetUnavailableError(f"ml-100k.{kind}: ids listed twice")
    return _Tables(ratings=tables["inter"], users=users, items=items)


def _rows(raw: bytes, name: str, kind: str) -> List[List[str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetUnavailableError(f"{name}: not UTF-8 text ({e})") from e
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if header != _HEADERS[kind]:
        raise DatasetUnavailableError(f"{name}:1: expected the columns {_HEADERS[kind]}, got {header}")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(header):
            raise DatasetUnavailableError(f"{name}:{lineno}: expected {len(header)} columns, got {len(cols)}")
        rows.append(cols)
    return rows


# ---------------------------------------------------------------------------------- converting
def _example(rating: List[str], users: Dict[str, List[str]], items: Dict[str, List[str]],
             where: str) -> List[str]:
    user_id, item_id, stars, timestamp = rating
    if user_id not in users or item_id not in items:
        raise DatasetUnavailableError(f"{where}: rating of an unknown user {user_id} or item {item_id}")
    try:
        stars_value = float(stars)
        float(timestamp)
    except ValueError:
        raise DatasetUnavailableError(f"{where}: rating {stars!r} or timestamp {timestamp!r} is not a number") from None
    _, age, gender, occupation, zip_code = users[user_id]
    _, title, year, genres = items[item_id]
    return [str(int(stars_value >= 4)), user_id, item_id, age, age_bucket(int(age)), gender, occupation,
            zip_code, release_year(year, title), GENRE_SEPARATOR.join(genres.split()), stars,
            timestamp]


def schema_document(tables: _Tables) -> Dict:
    """The schema file's document: vocabularies from the user and item tables."""
    users, items = tables.users.values(), tables.items.values()
    years = sorted({y for y in (release_year(i[2], i[1]) for i in items) if y})
    genres = sorted({g for i in items for g in i[3].split()})
    return {
        "delimiter": "\t",
        "header": True,
        "label": "label",
        "dense": ["age"],
        "dense_transform": "log1p",
        "missing_as_empty": True,  # the one item without a release year: an empty bag
        "categorical": {
            # Ids as they are: row = id (RecBole's ids start at 1; row 0 stays unused).
            "user_id": {"encoding": "int", "num_embeddings": max(int(u[0]) for u in users) + 1},
            "item_id": {"encoding": "int", "num_embeddings": max(int(i[0]) for i in items) + 1},
            "age_bucket": {"vocabulary": AGE_BUCKETS},
            "gender": {"vocabulary": sorted({u[2] for u in users})},
            "occupation": {"vocabulary": sorted({u[3] for u in users})},
            "zip_code": {"vocabulary": sorted({u[4] for u in users})},
            "release_year": {"vocabulary": years},
        },
        "multi_valued": {"genres": {"separator": GENRE_SEPARATOR, "vocabulary": genres}},
    }


def convert(out: str, source: Optional[str] = None, cache_dir: Optional[str] = None,
            split: str = "random", valid_fraction: float = 0.1, test_fraction: float = 0.1,
            seed: int = 0, max_ratings: Optional[int] = None) -> Dict:
    """Write MovieLens-100K as click logs into ``out`` (see the module docstring).

    Args:
        out: output directory (created; files in it are replaced).
        source: RecBole's wheel or a directory of its ml-100k atomic files; default: the wheel,
            fetched with pip into ``cache_dir``.
        split: ``"random"`` (seeded) or ``"time"`` (the latest ratings are the test set).
        valid_fraction, test_fraction: shares of the ratings in ``valid.tsv`` and ``test.tsv``.
        seed: the random split, the sample and the order of the training rows.
        max_ratings: convert a seeded random sample of this many ratings (a slice for tests).

    Returns:
        The metadata also written to ``out/meta.json``.
    """
    if split not in ("random", "time"):
        raise ValueError(f"split must be 'random' or 'time', got {split!r}")
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"valid_fraction {valid_fraction} and test_fraction {test_fraction} must be "
                         f">= 0 and leave training rows")
    source = source or fetch_recbole_wheel(cache_dir)
    tables = read_atomic_files(source)
    if max_ratings is None:
        counts = {"ratings": len(tables.ratings), "users": len(tables.users), "items": len(tables.items)}
        if os.path.isfile(source) and counts != FULL_COUNTS:
            raise DatasetUnavailableError(f"{source}: expected {FULL_COUNTS}, read {counts}")
    examples = [_example(r, tables.users, tables.items, f"ml-100k.inter:{i + 2}")
                for i, r in enumerate(tables.ratings)]
    rng = np.random.default_rng(seed)
    if max_ratings is not None:
        if max_ratings < 1:
            raise ValueError(f"max_ratings must be >= 1, got {max_ratings}")
        keep = np.sort(rng.permutation(len(examples))[:max_ratings])
        examples = [examples[i] for i in keep]
    n = len(examples)
    if split == "random":
        order = rng.permutation(n)
    else:  # by time; ties by user and item, so that the order is the data's, not the sort's
        order = np.array(sorted(range(n), key=lambda i: (float(examples[i][-1]), int(examples[i][1]),
                                                           int(examples[i][2]))))
    n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
    n_train = n - n_test - n_valid
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
             "test": order[n_train + n_valid:]}
    parts["train"] = rng.permutation(parts["train"])  # mixed, for minibatch training

    os.makedirs(out, exist_ok=True)
    meta = {"dataset": "MovieLens-100K", "source": os.path.abspath(source),
            "recbole_version": RECBOLE_VERSION, "split": split, "seed": seed,
            "valid_fraction": valid_fraction, "test_fraction": test_fraction,
            "max_ratings": max_ratings, "label": "rating >= 4", "splits": {}}
    for name, index in parts.items():
        path = os.path.join(out, SPLIT_FILES[name])
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(COLUMNS) + "\n")
            for i in index:
                f.write("\t".join(examples[i]) + "\n")
        os.replace(tmp, path)
        labels = [int(examples[i][0]) for i in index]
        meta["splits"][name] = {"file": SPLIT_FILES[name], "rows": len(labels),
                                "positive_rate": round(sum(labels) / len(labels), 4) if labels else None}
    write_schema_file(os.path.join(out, SCHEMA_FILE), schema_document(tables), comment=(
        "MovieLens-100K as a click log (label: rating >= 4), written by\n"
        "python -m shark_torchrec.data.movielens; see that module's docstring."))
    tmp = os.path.join(out, f"{META_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, META_FILE))  # last: its presence means "converted"
    logger.info("wrote MovieLens-100K to %s: %s", out,
                ", ".join(f"{k} {v['rows']} rows" for k, v in meta["splits"].items()))
    return meta


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (so that the ranks of one job convert only once)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_converted(data_dir: str) -> bool:
    """Whether ``data_dir`` holds a finished conversion (``meta.json`` is written last)."""
    return os.path.isfile(os.path.join(data_dir, META_FILE))


def ensure_ml100k(data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """A directory holding the converted data set: ``data_dir`` (converted into now if it holds
    no conversion and no other files), or ``cache_dir/ml-100k``.  Safe to call from every rank
    at once: one converts, the others wait for it."""
    target = data_dir or os.path.join(cache_dir or default_cache_dir(), "ml-100k")
    if is_converted(target):
        return target
    if os.path.isdir(target) and os.listdir(target):
        raise DatasetUnavailableError(
            f"--data_path {target}: holds files but no {META_FILE} of a MovieLens-100K conversion; "
            f"convert into it with `python -m shark_torchrec.data.movielens --out {target}` "
            f"(or use --data csv --schema FILE for other data)")
    with _locked(os.path.abspath(target).rstrip("/") + ".lock"):
        if not is_converted(target):  # another process may have finished while we waited
            convert(target, cache_dir=cache_dir)
    return target


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m shark_torchrec.data.movielens",
        description="Convert MovieLens-100K (fetched with pip from RecBole's wheel) into "
                    "tab-separated click logs (label: rating >= 4) plus their schema file.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", help="RecBole's wheel (.whl) or a directory of its ml-100k atomic "
                   "files (default: fetch the wheel with pip)")
    p.add_argument("--cache_dir", help=f"where the wheel is kept (default {default_cache_dir()})")
    p.add_argument("--split", choices=["random", "time"], default="random",
                   help="random: seeded 80/10/10 (default); time: the latest ratings are the test set")
    p.add_argument("--valid_fraction", type=float, default=0.1)
    p.add_argument("--test_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_ratings", type=int, help="convert a seeded random sample of this many ratings")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        meta = convert(args.out, source=args.source, cache_dir=args.cache_dir, split=args.split,
                       valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                       seed=args.seed, max_ratings=args.max_ratings)
    except (SharkInputError, ValueError) as e:
        p.error(str(e))
    print(json.dumps(meta["splits"]))


if __name__ == "__main__":
    main()
