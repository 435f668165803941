"""A heat map drawn over an image (matplotlib colormap, PIL), as an array or a PNG. No torch: the reports draw with it
too."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

COLORMAP = "jet"
ALPHA = 0.5
MIN_SIDE = 224  # smaller images are drawn larger, so the heat map can be read


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA, colormap: str = COLORMAP) -> np.ndarray:
    """(h, w, 3) uint8 and an (H, W) heat map in [0, 1] (any size: resized to the image, bilinear) -> (h', w', 3)
    uint8: the image blended with the colormap of the heat map, ``alpha`` of the colour where the map is hot and
    less where it is cold, so the picture stays visible; drawn at ``MIN_SIDE`` at least."""
    from matplotlib import colormaps  # only when something is drawn

    picture = Image.fromarray(np.ascontiguousarray(image, np.uint8))
    if min(picture.size) < MIN_SIDE:
        scale = MIN_SIDE / min(picture.size)
        picture = picture.resize(
            (round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR
        )
    heat = Image.fromarray(np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0))  # mode F
    heat_array = np.asarray(heat.resize(picture.size, Image.Resampling.BILINEAR), np.float32).clip(0.0, 1.0)
    colour = colormaps[colormap](heat_array)[..., :3].astype(np.float32) * 255.0
    weight = (alpha * (0.35 + 0.65 * heat_array))[..., None]
    blended = np.asarray(picture, np.float32) * (1.0 - weight) + colour * weight
    result: np.ndarray = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return result


def png_bytes(pixels: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> a PNG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA, colormap: str = COLORMAP) -> bytes:
    return png_bytes(overlay(image, heatmap, alpha, colormap))
