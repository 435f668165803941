"""Bytes -> RGB uint8 pixels, or ImageRejected with a reason. Limits are checked before pixels are decoded.

Two decoders: ``decode_image`` (PIL, any format, JPEGs decoded at reduced size by the DCT: the cheap one on a CPU) and
``decode_jpegs`` (torchvision.io, batched JPEGs straight into device memory: nvJPEG on a GPU).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn.functional import interpolate
from torchvision.io import ImageReadMode, decode_jpeg

from deeptarget.errors import ImageRejected

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

# Magic bytes of the formats above; a download is checked against these before it is stored.
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_image_type(head: bytes) -> str | None:
    """The image type the first bytes announce, or None when they are not an image we accept."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def check_pixels(width: int, height: int, *, max_pixels: int) -> None:
    """ImageRejected ``too_many_pixels`` over the limit: checked from the header, before any pixel is decoded."""
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")


def check_dimensions(width: int, height: int, *, max_pixels: int) -> None:
    check_pixels(width, height, max_pixels=max_pixels)
    if width < 8 or height < 8:
        raise ImageRejected("too_small", f"{width}x{height}")


def decode_image(data: bytes, *, max_pixels: int, long_side: int) -> np.ndarray:
    """Decode to RGB with EXIF orientation applied, downscaled so the long side is at most ``long_side``.

    JPEGs are decoded at reduced size by the DCT (PIL ``draft``), which is most of what keeps decoding cheap.
    """
    if not data:
        raise ImageRejected("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageRejected("unsupported_format", str(image.format))
            check_dimensions(*image.size, max_pixels=max_pixels)
            if image.format == "JPEG":
                image.draft("RGB", (long_side, long_side))
            image.seek(0)  # first frame of a GIF / multi-page TIFF
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_many_pixels", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", "unrecognised image data") from err
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated_image" if "truncated" in str(err) else "corrupt_image"
        raise ImageRejected(reason, str(err)) from err
    if max(rgb.size) > long_side:
        rgb.thumbnail((long_side, long_side), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the image's own range instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as they are shown in a feed.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def probe_jpeg(data: bytes, *, max_pixels: int) -> bool:
    """True when ``data`` is a JPEG within the pixel limit, to be decoded by ``decode_jpegs``; False for any other
    format (decode it with ``decode_image``). Reads the header only; raises ImageRejected like ``decode_image``."""
    if sniff_image_type(data[:16]) != "jpeg":
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.mode == "CMYK":
                return False  # nvJPEG's RGB conversion of CMYK is not PIL's; leave those to PIL
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", "unrecognised image data") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected("corrupt_image", str(err)) from err
    check_dimensions(width, height, max_pixels=max_pixels)
    return True


def decode_jpegs(datas: list[bytes], device: torch.device, *, long_side: int) -> list[torch.Tensor | ImageRejected]:
    """JPEGs -> RGB (3, H, W) uint8 tensors on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU), EXIF orientation
    applied, downscaled so the long side is at most ``long_side``. One batched call; when it fails, each image alone,
    so one corrupt file is rejected and the others go on."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    decoded: list[torch.Tensor | ImageRejected]
    try:
        decoded = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        decoded = [_decode_one(tensor, device) for tensor in tensors]
    return [image if isinstance(image, ImageRejected) else downscale(image, long_side) for image in decoded]


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | ImageRejected:
    try:
        return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError as err:
        reason = "truncated_image" if "truncated" in str(err) or "incomplete" in str(err) else "corrupt_image"
        return ImageRejected(reason, str(err).splitlines()[0][-200:])


def downscale(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the same with the long side at most ``long_side`` (antialiased bilinear)."""
    height, width = image.shape[-2:]
    scale = long_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize_uint8(image, size)


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)
