"""Argument types that several command groups use, and the check of an input file.

A bad value is argparse's error (exit 2, with the reason), never a traceback (issue 12, L10).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from deeptarget.core.errors import DeepTargetError
from deeptarget.core.terminal import plain

MAX_POST_ID_CHARS = 200  # as schema.Post's: every stored id can be named
# scraper.push.ID_PATTERN, which every pushed id meets (importing scraper.push here would load torch per command)
POST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


def whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return whole


def number(low: float, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite number from ``low`` (excluded with ``above``) to ``high``: NaN and infinities are refused."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            bound = (f"above {low:g}" if above else f"from {low:g}") + (f" to {high:g}" if math.isfinite(high) else "")
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a finite number {bound}")
        return value

    return number


def checked(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argument type from a library check that raises ValueError: the same rule at the door and inside."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(plain(err)) from None

    return parse


def post_id(text: str) -> str:
    if not 0 < len(text) <= MAX_POST_ID_CHARS or not POST_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"post id {plain(text)!r}: 1 to {MAX_POST_ID_CHARS} letters, digits and _ . : -, starting with a letter "
            "or digit"
        )
    return text


def input_file(path: str, what: str) -> None:
    """``path`` must be something to read from: a regular file or a pipe (not a directory or a device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise DeepTargetError(f"{what} {plain(path)}: {err.strerror or type(err).__name__}") from None
    if stat.S_ISDIR(mode):
        raise DeepTargetError(f"{what} {plain(path)}: a directory, not a file")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise DeepTargetError(f"{what} {plain(path)}: not a regular file")
