"""argparse value types the sub-commands share: a bad value is one usage line naming the flag."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """A whole number >= 1 (``type=`` of a count flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
