"""One HTML page per report: sections of text, tables and figures. Figures are saved as PNG files next to the page
and embedded in it as data URIs, so the page alone can be mailed or attached to a ticket.

A report's name (its folder under the reports dir: ``report_folder``) and its figures' names are path segments, held
to ``REPORT_NAME_PATTERN`` so that none leads outside (issue 12, L7)."""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI

from matplotlib.figure import Figure

from deeptarget.store.versioned import atomic_write

# Labels are data (scraped hashtags, usernames): a '$...$' in one must be shown, not parsed as mathtext, which
# raised on malformed input and stopped every report that showed it (issue 12, M8).
matplotlib.rcParams["text.parse_math"] = False

REPORT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # no '/', and '.' or '..' can't start one
_REPORT_NAME_RE = re.compile(REPORT_NAME_PATTERN)


def check_report_name(name: object, what: str = "report name") -> str:
    """``name`` if it can be one path segment of a report; raises ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _REPORT_NAME_RE.fullmatch(name):
        raise ValueError(f"{what} {name!r}: 1 to 128 letters, digits, _ . and -, starting with a letter or digit")
    return name


def report_folder(reports_dir: Path, name: str) -> Path:
    """Where the report ``name`` goes: a folder directly in ``reports_dir``."""
    return Path(reports_dir) / check_report_name(name)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: 90%; }
img { max-width: 100%; }
"""


@dataclass
class Report:
    """Add sections in order, then ``write(folder)``: ``index.html`` plus one PNG per figure."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def figure(self, name: str, figure: Figure, caption: str) -> None:
        """``name`` becomes ``<name>.png``; it must be unique within the report."""
        check_report_name(name, "figure name")
        if name in self.figures:
            raise ValueError(f"figure {name!r} is already in the report")
        self.figures[name] = figure
        self.blocks.append(("figure", (name, caption)))

    def write(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pngs: dict[str, bytes] = {}
        for name, figure in self.figures.items():
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            pngs[name] = buffer.getvalue()
            _write_bytes(folder / f"{name}.png", pngs[name])
        page = self._render(pngs)
        path = folder / "index.html"
        _write_bytes(path, page.encode())
        return path

    def _render(self, pngs: dict[str, bytes]) -> str:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        parts = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1><p><small>{stamp}</small></p>",
        ]
        for kind, value in self.blocks:
            if kind == "figure":
                name, caption = value
                data = base64.b64encode(pngs[name]).decode()
                parts.append(
                    f"<figure id='{html.escape(name)}'><img alt='{html.escape(caption)}' "
                    f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)} "
                    f"(<a href='{html.escape(name)}.png'>{html.escape(name)}.png</a>)</figcaption></figure>"
                )
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows
                )
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            else:
                parts.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    """A figure that is not registered with pyplot (so nothing leaks between reports in a long-lived process)."""
    return Figure(figsize=(width, height), layout="constrained")
