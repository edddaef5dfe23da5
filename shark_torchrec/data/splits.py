"""A seeded train / validation / test split of click-log files, decided line by line.

When all a user has is one file (or one set of files), :class:`LineSplit` sends every data
line to ``train``, ``dev`` (validation) or ``test`` by a hash of ``(seed, file name, line
number)``: the split is the same in every process, data-loader worker and run, needs no
second copy of the data and no pass over it before training, and a line's split does not
depend on any other line (so appending lines to a file leaves the earlier lines' splits
alone).  The fractions are met in expectation (each line is an independent draw), not to the
line: 10% of 1,000 lines is 100 ± 10.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class LineSplit:
    """Assign lines to ``train``/``dev``/``test`` with a seeded hash.

    Attributes:
        valid_fraction: expected share of lines in ``dev``.
        test_fraction: expected share of lines in ``test``.
        seed: which split (another seed, another random assignment).
    """

    valid_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"LineSplit.{name} must be in [0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"LineSplit: valid_fraction + test_fraction = "
                f"{self.valid_fraction + self.test_fraction:g} leaves no training lines"
            )

    def split_of(self, path: str, lineno: int) -> str:
        """The split of line ``lineno`` (1-based, header included) of file ``path``.

        Only the file's base name counts, so moving the data elsewhere keeps the split.
        """
        key = f"{self.seed}\0{os.path.basename(path)}\0{lineno}".encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2.0 ** 64
        if u < self.test_fraction:
            return "test"
        if u < self.test_fraction + self.valid_fraction:
            return "dev"
        return "train"

    def selector(self, split: str) -> "SplitSelector":
        """A line filter ``(path, lineno) -> bool`` that keeps the lines of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (one of {SPLITS})")
        return SplitSelector(self, split)

    def describe(self) -> str:
        """The split in words, for messages."""
        return (f"seeded line split (seed {self.seed}): train {1 - self.valid_fraction - self.test_fraction:g}, "
                f"valid {self.valid_fraction:g}, test {self.test_fraction:g}")


@dataclass(frozen=True)
class SplitSelector:
    """Keeps the lines of one split of a :class:`LineSplit` (picklable, for data-loader workers)."""

    split: LineSplit
    name: str

    def __call__(self, path: str, lineno: int) -> bool:
        return self.split.split_of(path, lineno) == self.name

    def describe(self) -> str:
        """Which lines this keeps, in words."""
        return f"the {self.name} part of a {self.split.describe()}"
