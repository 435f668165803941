"""Data on the terminal: scraped usernames, hashtags, captions and error texts are shown as text, never obeyed.

Two dangers (issue 12, L9): rich reads ``[...]`` as markup (``[/]`` with nothing open raised and stopped the demo's
printout; ``[link=...]`` makes a hyperlink), and the terminal reads control characters: an ANSI escape recolours the
screen or sets the window title, a carriage return overwrites what the line said, a bidi override shows the text
backwards. ``shown`` is for text that rich parses (``console.print``, table cells); ``plain`` for ``print``;
``json_text`` for JSON put on a terminal (it stays the same JSON).
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console
from rich.markup import escape

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI on some terminals), and the bidi embeddings, overrides,
# isolates and marks, which reorder what follows them on screen.
_WIDE_CONTROLS = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL_RE = re.compile(f"[\x00-\x1f{_WIDE_CONTROLS}]")
_BREAK_RE = re.compile("[\t\n\u2028\u2029]")  # these separate words: a space keeps the words apart
# json.dumps escapes C0 inside strings itself; what is left raw outside them is its own indentation.
_JSON_UNSAFE_RE = re.compile(f"[{_WIDE_CONTROLS}\u2028\u2029]")


def plain(value: object) -> str:
    """``value`` as one line of inert text: tabs and line breaks become spaces, other control characters go."""
    return _CONTROL_RE.sub("", _BREAK_RE.sub(" ", str(value)))


def shown(value: object) -> str:
    """``value`` for rich (markup strings, table cells): ``plain``, with its brackets escaped so rich shows them."""
    return escape(plain(value))


def json_text(value: Any) -> str:
    """Indented JSON whose control characters are all ``\\uXXXX`` escapes: the same data, inert on a terminal
    (``ensure_ascii=False`` keeps letters readable but lets DEL, C1 and bidi controls through as they are)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _JSON_UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def console(**options: Any) -> Console:
    """A rich console that leaves ``:name:`` alone (emoji codes in data are text too)."""
    return Console(emoji=False, **options)
