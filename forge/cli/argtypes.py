"""Argument types shared by the ``forge`` subcommands: a bad value is a one-line usage
error naming what was wrong."""

from __future__ import annotations

import argparse
import math


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value}") from None
    # Infinity would make a wait or a refresh period never end.
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return number


def version_number(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"not a version number: {value!r}")
    return int(value)


def vector(value: str) -> list[float]:
    """``0.1,0.2,...`` or ``[0.1, 0.2, ...]``: finite numbers, at least one."""
    text = value.strip().removeprefix("[").removesuffix("]")
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {value!r}") from None
    # math, not numpy: parsing the command line must not import numpy.
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise argparse.ArgumentTypeError(f"not a finite, non-empty vector: {value!r}")
    return numbers
