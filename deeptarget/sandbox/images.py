"""Sandbox pictures: real photographs shipped with scikit-image, varied by crops, flips and colour, plus generated ones.

Each topic has a visual identity (its base photos or its generator), so posts under different hashtags look
different and similarity search has something to find. The astronaut photo holds a face the Haar cascade finds; a
``selfie`` variant pastes that face onto another topic's picture, so faces appear across topics.
Everything is a pure function of a seed.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Callable, Iterable
from functools import cache

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance

# Where the Haar cascade finds the astronaut's face (x, y, w, h); crops of face posts keep it whole.
ASTRONAUT_FACE = (177, 67, 93, 93)


@cache
def _photo(name: str) -> np.ndarray:
    named: dict[str, Callable[[], np.ndarray]] = {
        # stereo_motorcycle is unannotated in scikit-image
        "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],  # type: ignore[no-untyped-call]
    }
    loader: Callable[[], np.ndarray] | None = named.get(name, getattr(skimage.data, name, None))
    if loader is None:
        raise KeyError(f"scikit-image has no sample photo {name!r}")
    image = np.asarray(loader())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _random_crop(rng: np.random.Generator, image: np.ndarray, keep: tuple[int, int, int, int] | None) -> np.ndarray:
    height, width = image.shape[:2]
    scale = rng.uniform(0.55, 1.0)
    aspect = rng.uniform(0.8, 1.25)
    crop_h = min(height, int(height * scale))
    crop_w = min(width, int(crop_h * aspect * width / height))
    if keep is not None:
        kx, ky, kw, kh = keep
        crop_w, crop_h = max(crop_w, kw + 16), max(crop_h, kh + 16)
        x_lo, x_hi = max(0, kx + kw + 8 - crop_w), min(kx - 8, width - crop_w)
        y_lo, y_hi = max(0, ky + kh + 8 - crop_h), min(ky - 8, height - crop_h)
    else:
        x_lo, x_hi, y_lo, y_hi = 0, width - crop_w, 0, height - crop_h
    x = int(rng.integers(x_lo, max(x_lo, x_hi) + 1))
    y = int(rng.integers(y_lo, max(y_lo, y_hi) + 1))
    return image[y : y + crop_h, x : x + crop_w]


def _recolour(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    shift = rng.uniform(-0.03, 0.03)  # a small hue rotation, as filters do
    if abs(shift) > 0.005:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256).astype(np.uint8)
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


def _sunset(rng: np.random.Generator, size: int = 480) -> np.ndarray:
    top = colorsys.hsv_to_rgb(rng.uniform(0.70, 0.80), 0.7, rng.uniform(0.3, 0.6))
    bottom = colorsys.hsv_to_rgb(rng.uniform(0.02, 0.10), 0.9, 1.0)
    t = np.linspace(0, 1, size)[:, None, None]
    sky = (np.array(top)[None, None] * (1 - t) + np.array(bottom)[None, None] * t) * 255
    image = Image.fromarray(np.repeat(sky, size, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.5, 0.8) * size, rng.uniform(0.06, 0.14) * size
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, int(rng.uniform(180, 230)), 90))
    horizon = int(rng.uniform(0.7, 0.85) * size)
    draw.rectangle([0, horizon, size, size], fill=(20, 12, int(rng.uniform(20, 50))))
    return np.asarray(image)


def _geometry(rng: np.random.Generator, size: int = 480) -> np.ndarray:
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        colour = tuple(int(v) for v in rng.integers(0, 200, 3))
        x0, y0 = rng.uniform(0, 0.8, 2) * size
        extent = rng.uniform(0.1, 0.35) * size
        box = [x0, y0, x0 + extent, y0 + extent]
        if rng.random() < 0.5:
            draw.rectangle(box, fill=colour)
        else:
            draw.ellipse(box, fill=colour)
    return np.asarray(image)


GENERATORS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {"sunset": _sunset, "geometry": _geometry}


def preload(sources: Iterable[str]) -> None:
    """Loads the photos among ``sources`` (and the astronaut, whose face selfies wear) before the first render needs
    them: the first load imports scikit-image's readers, which takes a second or more on a busy machine."""
    for name in sorted({*sources, "astronaut"} - GENERATORS.keys()):
        _photo(name)


def render(seed: int, sources: tuple[str, ...], *, face: bool = False, selfie: bool = False) -> np.ndarray:
    """One post's picture as RGB uint8. ``sources`` are photo names or generator names (one is picked)."""
    rng = np.random.default_rng(seed)
    source = sources[int(rng.integers(len(sources)))]
    if source in GENERATORS:
        base = GENERATORS[source](rng)
        keep = None
    else:
        base = _photo(source)
        keep = ASTRONAUT_FACE if face and source == "astronaut" else None
    cropped = _random_crop(rng, base, keep)
    if rng.random() < 0.5:
        cropped = cropped[:, ::-1]
    image = _recolour(rng, Image.fromarray(np.ascontiguousarray(cropped)))
    if selfie:
        image = _paste_face(rng, image)
    long_side = int(rng.integers(320, 641))
    scale = long_side / max(image.size)
    size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def _paste_face(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    x, y, w, h = ASTRONAUT_FACE
    pad = w // 2
    face = Image.fromarray(_photo("astronaut")[y - pad // 2 : y + h + pad, x - pad // 2 : x + w + pad // 2])
    side = int(min(image.size) * rng.uniform(0.35, 0.5))
    face = face.resize((side, round(side * face.height / face.width)), Image.Resampling.BILINEAR)
    image = image.copy()
    image.paste(
        face,
        (
            int(rng.integers(0, image.width - face.width + 1)),
            int(rng.integers(0, max(1, image.height - face.height) + 1)),
        ),
    )
    return image


def jpeg_bytes(image: np.ndarray, seed: int) -> bytes:
    quality = int(np.random.default_rng(seed).integers(78, 95))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
