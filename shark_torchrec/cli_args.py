"""Argument types for the command lines: flag values checked when the flags are parsed.

Each function is an ``argparse`` ``type=``: it converts the text or raises
``argparse.ArgumentTypeError``, which argparse prints as ``argument --FLAG: MESSAGE`` and exits
with status 2, before any process group, data or model exists.  So ``--batch_size 0`` fails
at once, naming the flag, instead of minutes later (or never, silently).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Dict, List, Optional

__all__ = [
    "DEBUG_HELP",
    "LOG_LEVELS",
    "existing_dir",
    "existing_file",
    "fraction",
    "log_level",
    "nonnegative_float",
    "nonnegative_int",
    "output_dir",
    "output_file",
    "positive_float",
    "positive_int",
    "positive_int_list",
    "tier_fractions",
    "unit_fraction",
]

DEBUG_HELP = "show the Python traceback of errors caused by bad input (files, flags, data)"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, steps)."""
    value = _int(text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def row_count_or_all(text: str) -> Optional[int]:
    """An integer >= 1, or ``all`` (None: no limit)."""
    return None if text.strip().lower() == "all" else positive_int(text)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "none" or "off")."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, capacities)."""
    value = _float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A fraction in [0, 1): a share that may be nothing but must leave something."""
    value = _float(text, "a fraction in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value:g}")
    return value


def unit_fraction(text: str) -> float:
    """A fraction in (0, 1]: a share that must be something and may be everything."""
    value = _float(text, "a fraction in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value:g}")
    return value


def closed_fraction(text: str) -> float:
    """A fraction in [0, 1]: nothing, everything or a share between."""
    value = _float(text, "a fraction in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value:g}")
    return value


def positive_int_list(text: str) -> List[int]:
    """Comma-separated integers >= 1, at least one (layer sizes)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def tier_list(text: str) -> str:
    """``tier,tier,...``: known tiers, none twice.  Returns the text unchanged (the job parses
    it); only its validity is checked here."""
    from shark_torchrec.quant.tiers import Tier  # imports FBGEMM: only when the flag is used

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected tiers, e.g. fp16,int8,int4,int2,shared, got {text!r}")
    try:
        tiers = [Tier.parse(n) for n in names]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if len(set(tiers)) != len(tiers):
        raise argparse.ArgumentTypeError(f"{text!r}: a tier named twice")
    return text


def tier_fractions(text: str) -> Dict[str, float]:
    """``tier=fraction,...`` with known tiers, fractions >= 0 summing to 1, as
    ``{tier: fraction}`` (the tiers as written)."""
    from shark_torchrec.quant.tiers import Tier  # imports FBGEMM: only when the flag is used

    fractions = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected tier=fraction,... (e.g. fp16=0.1,int8=0.9), "
                                             f"got {item!r} in {text!r}")
        try:
            Tier.parse(name.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        fractions[name.strip()] = _float(value, f"a fraction for tier {name.strip()!r}")
    if min(fractions.values()) < 0 or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise argparse.ArgumentTypeError(f"fractions must be >= 0 and sum to 1, got {text!r}")
    return fractions


def log_level(text: str) -> str:
    """A ``logging`` level name, any case (returned upper-case)."""
    level = text.upper()
    if level not in LOG_LEVELS or not isinstance(getattr(logging, level, None), int):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def existing_file(text: str) -> str:
    """The path of a file that exists (an input)."""
    if not os.path.isfile(text):
        why = "is a directory, not a file" if os.path.isdir(text) else "no such file"
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def existing_dir(text: str) -> str:
    """The path of a directory that exists (an earlier run's output)."""
    if not os.path.isdir(text):
        why = "is a file, not a directory" if os.path.exists(text) else "no such directory"
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def output_dir(text: str) -> str:
    """A directory to write into: it may exist (runs resume there) but must not be a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is an existing file, not a directory")
    return text


def output_file(text: str) -> str:
    """A file to write: not a directory, and its directory exists (checked now, not after the
    work whose result it would hold)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} does not exist")
    return text
