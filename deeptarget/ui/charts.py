"""Small charts as inline SVG, drawn on the server: no chart library to ship, readable in a screenshot, and every
label escaped (a hashtag or a username is text a stranger wrote)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from markupsafe import Markup, escape

BAR_HEIGHT = 22
LABEL_WIDTH = 150
CHART_WIDTH = 460


def bars(items: Sequence[tuple[str, float]], value_format: str = "{:.0%}", limit: int = 12) -> Markup:
    """Horizontal bars, largest first, each labelled with its value; an empty chart says so."""
    shown = sorted(items, key=lambda item: -item[1])[:limit]
    if not shown:
        return Markup('<p class="empty">nothing yet</p>')
    top = max(value for _, value in shown) or 1.0
    bar_space = CHART_WIDTH - LABEL_WIDTH - 60
    rows = []
    for i, (label, value) in enumerate(shown):
        y = i * BAR_HEIGHT
        width = max(1.0, bar_space * value / top)
        rows.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 15}" text-anchor="end">{escape(_short(label))}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y + 4}" width="{width:.1f}" height="{BAR_HEIGHT - 8}" rx="3"/>'
            f'<text x="{LABEL_WIDTH + width + 6:.1f}" y="{y + 15}">{escape(value_format.format(value))}</text>'
        )
    height = len(shown) * BAR_HEIGHT
    return Markup(
        f'<svg class="chart bars" viewBox="0 0 {CHART_WIDTH} {height}" role="img" '
        f'aria-label="bar chart">{"".join(rows)}</svg>'
    )


def timeline(points: Sequence[tuple[datetime, float]], value_format: str = "{:.1%}") -> Markup:
    """Values over time as dots joined by a line, with the first and last dates and the range of values."""
    points = sorted(points)
    if len(points) < 2:
        return Markup('<p class="empty">too few dated posts to draw</p>')
    width, height, pad = CHART_WIDTH, 160, 36
    start, end = points[0][0].timestamp(), points[-1][0].timestamp()
    low, high = min(v for _, v in points), max(v for _, v in points)
    span_t, span_v = (end - start) or 1.0, (high - low) or 1.0

    def xy(when: datetime, value: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (when.timestamp() - start) / span_t
        y = height - pad + (2 * pad - height) * (value - low) / span_v
        return x, y

    coords = [xy(when, value) for when, value in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coords)
    labels = (
        f'<text x="{pad}" y="{height - 8}">{points[0][0]:%Y-%m-%d}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{points[-1][0]:%Y-%m-%d}</text>'
        f'<text x="4" y="{pad - 8}">{escape(value_format.format(high))}</text>'
        f'<text x="4" y="{height - pad + 14}">{escape(value_format.format(low))}</text>'
    )
    return Markup(
        f'<svg class="chart timeline" viewBox="0 0 {width} {height}" role="img" aria-label="timeline">'
        f'<polyline points="{line}"/>{dots}{labels}</svg>'
    )


def _short(label: str, length: int = 22) -> str:
    return label if len(label) <= length else label[: length - 1] + "…"
