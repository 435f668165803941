"""The figures the reports draw, each a function from plain arrays to a matplotlib ``Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from deeptarget.models.overlay import overlay
from deeptarget.reports.html import new_figure

THUMBNAIL_PX = 160


def learning_curves(history: Sequence[Mapping[str, float]], x: str, x_label: str) -> Figure:
    """Loss (left) and accuracy (right) against ``x``: every other numeric key of the rows is a curve."""
    figure = new_figure(10, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    steps = [row[x] for row in history]
    for key in sorted({k for row in history for k in row} - {x}):
        values = [row.get(key, np.nan) for row in history]
        axes = loss_axes if "loss" in key else accuracy_axes
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key.replace("_", " "))
    for axes, label in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel(x_label)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend()
    return figure


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """Rows are the true classes, normalised to recall; the counts are printed in the cells when there is room."""
    size = max(5.0, 0.45 * len(classes) + 2)
    figure = new_figure(size + 1, size)
    axes = figure.subplots()
    recall = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    shown = axes.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes, label="share of the true class")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=60, ha="right")
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(classes) <= 25:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    colour = "white" if recall[i, j] > 0.5 else "black"
                    axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=8)
    return figure


def confused_examples(pairs: Sequence[tuple[str, str, int, Sequence[Path]]], per_pair: int = 5) -> Figure:
    """One row per (true, predicted, count, example images) pair, most confused first."""
    rows = max(1, len(pairs))
    figure = new_figure(2.0 * per_pair + 1.5, 2.1 * rows)
    grid = np.atleast_2d(figure.subplots(rows, per_pair, squeeze=False))
    for axes in grid.flat:
        axes.axis("off")
    for row, (true, predicted, count, examples) in enumerate(pairs):
        grid[row, 0].set_title(f"{true} → {predicted} ({count}×)", loc="left", fontsize=9)
        for col, path in enumerate(list(examples)[:per_pair]):
            try:
                with Image.open(path) as image:
                    image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
                    thumbnail = image.convert("RGB")
                    thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            except OSError:
                continue  # an unreadable example leaves its cell empty
            grid[row, col].imshow(np.asarray(thumbnail))
    return figure


def heatmap_examples(rows: Sequence[tuple[str, np.ndarray, Sequence[tuple[str, np.ndarray]]]]) -> Figure:
    """One row per (title, image, [(caption, heat map), ...]): the image, then each heat map drawn over it."""
    columns = 1 + max((len(maps) for _, _, maps in rows), default=0)
    figure = new_figure(2.3 * columns, 2.5 * max(1, len(rows)))
    grid = np.atleast_2d(figure.subplots(max(1, len(rows)), columns, squeeze=False))
    for axes in grid.flat:
        axes.axis("off")
    for row, (title, image, maps) in enumerate(rows):
        grid[row, 0].imshow(image)
        grid[row, 0].set_title(title, loc="left", fontsize=8)
        for col, (caption, heatmap) in enumerate(maps, start=1):
            grid[row, col].imshow(overlay(image, heatmap))
            grid[row, col].set_title(caption, fontsize=8)
    return figure


def embedding_map(points: np.ndarray, labels: np.ndarray, classes: Sequence[str], method: str) -> Figure:
    """2-D points coloured by class, like the food study's t-SNE plots."""
    figure = new_figure(8, 6.5)
    axes = figure.subplots()
    colours = _palette(len(classes))
    for index, name in enumerate(classes):
        chosen = labels == index
        if chosen.any():
            axes.scatter(points[chosen, 0], points[chosen, 1], s=10, color=colours[index], label=name, alpha=0.8)
    axes.set_title(f"{method} of the embeddings")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


def bars(values: Mapping[str, float], title: str, x_label: str, horizontal: bool = True) -> Figure:
    """A bar per key, in the mapping's order (largest first reads best horizontally)."""
    names, heights = list(values), [float(v) for v in values.values()]
    figure = new_figure(8, max(3.0, 0.28 * len(names) + 1.2) if horizontal else 4.5)
    axes = figure.subplots()
    if horizontal:
        axes.barh(names[::-1], heights[::-1], color="#4477aa")
        axes.set_xlabel(x_label)
    else:
        axes.bar(names, heights, color="#4477aa")
        axes.set_ylabel(x_label)
        axes.tick_params(axis="x", rotation=45)
    axes.set_title(title)
    axes.grid(axis="x" if horizontal else "y", alpha=0.3)
    return figure


def histogram(values: np.ndarray, title: str, x_label: str, bins: int = 40, log_x: bool = False) -> Figure:
    figure = new_figure(8, 4)
    axes = figure.subplots()
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if log_x:
        values = values[values > 0]
        edges: int | list[float] = (
            np.logspace(np.log10(values.min()), np.log10(values.max()), bins).tolist() if len(values) else bins
        )
        axes.set_xscale("log")
    else:
        edges = bins
    axes.hist(values, bins=edges, color="#4477aa")
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel("count")
    axes.grid(alpha=0.3)
    return figure


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]
