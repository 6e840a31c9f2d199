"""Value checks shared by every command: numbers that are finite and in range, paths that are given.

A ``<= 0`` check lets NaN through (every comparison with NaN is false) and ``float("1e400")`` is inf, so each check
here asks for a finite number first. Two forms of the same rules:

    number("train.lr", value, gt=0)                      # -> the float, or ValueError naming the key
    parser.add_argument("--mfu", type=arg_number(gt=0, le=1))   # argparse: "argument --mfu: must be in (0, 1], got 5"
"""

from __future__ import annotations

import argparse
import math


def _bounds(gt=None, ge=None, lt=None, le=None) -> str:
    lo = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else "(-inf"
    hi = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else "inf)"
    if hi == "inf)" and lo != "(-inf":
        return f"> {gt:g}" if gt is not None else f">= {ge:g}"
    return f"in {lo}, {hi}"


def range_error(value: float, *, gt=None, ge=None, lt=None, le=None, integer: bool = False) -> str | None:
    """None when ``value`` is a finite number within the bounds, else what was expected ("must be > 0, got nan")."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be {kind}, got {value!r}"
    if integer and value != int(value):
        return f"must be {kind}, got {value!r}"
    if (gt is not None and not value > gt) or (ge is not None and not value >= ge) or \
            (lt is not None and not value < lt) or (le is not None and not value <= le):
        return f"must be {_bounds(gt, ge, lt, le)}, got {value:g}"
    return None


def number(where: str, value, **bounds) -> float:
    """``value`` as a float when finite and within ``bounds`` (gt/ge/lt/le); else ValueError("where: must be ...")."""
    error = range_error(value, **bounds)
    if error:
        raise ValueError(f"{where} {error}")
    return float(value)


def arg_number(*, integer: bool = False, **bounds):
    """An argparse ``type=``: parses the flag, then the same rules (bad values end as argparse's one-line error)."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}")
        error = range_error(value, integer=integer, **bounds)
        if error:
            raise argparse.ArgumentTypeError(error)
        return value

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in its message
    return parse


positive_int = arg_number(integer=True, ge=1)
nonnegative_int = arg_number(integer=True, ge=0)


def arg_path(text: str) -> str:
    """An argparse ``type=`` for a path: not empty (``Path("")`` is the current directory, which always exists)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text
