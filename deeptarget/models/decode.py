"""Bytes -> RGB uint8 pixels, or ImageRejected with a reason. Limits are checked before pixels are decoded.

Two decoders: ``decode_image`` (PIL, any format, JPEGs decoded at reduced size by the DCT: the cheap one on a CPU) and
``decode_jpegs`` (torchvision.io, batched JPEGs straight into device memory: nvJPEG on a GPU). torch is imported by
the second only, so the first and the header checks (the scraper's) cost no torch.

What a decode may cost is bounded from the header, by format and bit depth, not by pixels alone: a 38-byte WebP or
a 70 KB 16-bit PNG can declare 40M pixels, and what the decoder holds for them differs tenfold between formats
(``decode_cost``). An image whose decode would hold more than ``max_decode_bytes`` is rejected ``too_costly``.
What is decoded is then converted to RGB and reduced strip by strip, so only one strip is ever held in a wider mode.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageMode, JpegImagePlugin, TiffImagePlugin, UnidentifiedImageError

from deeptarget.core.errors import ImageRejected
from deeptarget.core.image_header import check_dimensions, sniff_image_type

if TYPE_CHECKING:
    import torch

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

# The same default as Settings.max_decode_bytes, for callers that pass none (the workers' decode threads). It admits
# any PNG, GIF or JPEG within max_image_pixels (40M), a 12-megapixel WebP, a 16-bit one-strip TIFF of 17M pixels.
DEFAULT_MAX_DECODE_BYTES = 256 * 1024 * 1024

# Each scan of a progressive JPEG is another pass over every block: 5000 copies of one empty scan (460 KB) took 4 s.
# Encoders write about 10; a camera's thumbnail and an MPO's other pictures add theirs.
MAX_JPEG_SCANS = 100

# PIL decodes run-length BMPs in Python, about 60 ns a pixel whatever the file size (26 KB took 2.5 s at 40M).
MAX_BMP_RLE_PIXELS = 4_000_000

_STRIP_PIXELS = 1 << 20  # converted to RGB a strip at a time: 4 MB in each mode it goes through
_WORKING_BYTES = 24 * 1024 * 1024  # a strip in the five modes it may take (RGBA over white), the decoder's rows

# What libwebp holds beside PIL's copy: its canvas, the previous frame's and the frame handed to PIL (RGBA each).
_WEBP_EXTRA_BYTES_PER_PIXEL = 12

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def check_cost(cost: int, *, max_decode_bytes: int) -> None:
    """ImageRejected ``too_costly`` when decoding would hold more than ``max_decode_bytes``."""
    if cost > max_decode_bytes:
        raise ImageRejected("too_costly", f"decoding needs about {cost >> 20} MB > {max_decode_bytes >> 20} MB")


def decode_image(
    data: bytes, *, max_pixels: int, long_side: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> np.ndarray:
    """Decode to RGB with EXIF orientation applied, downscaled so the long side is at most ``long_side``.

    JPEGs are decoded at reduced size by the DCT (PIL ``draft``), which is most of what keeps decoding cheap. Other
    formats cannot be decoded scaled: their cost is bounded from the header (``decode_cost``) before decoding.
    Only the first frame of an animation is decoded.
    """
    if not data:
        raise ImageRejected("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _check_before_open(data, max_pixels=max_pixels, long_side=long_side, max_decode_bytes=max_decode_bytes)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageRejected("unsupported_format", str(image.format))
            check_dimensions(*image.size, max_pixels=max_pixels)
            check_cpu_cost(image, data)
            full_size = image.size
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (long_side, long_side))
            check_cost(decode_cost(image, full_size, data, long_side), max_decode_bytes=max_decode_bytes)
            image.seek(0)  # first frame of a GIF / multi-page TIFF
            image.load()
            rgb = _reduced_rgb(image, long_side)
            orientation = _ORIENTATION.get(image.getexif().get(0x0112, 1))
            if orientation is not None:
                rgb = rgb.transpose(orientation)
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


# -- what a decode costs, from the header ----------------------------------------------------------------------------
def decode_cost(image: Image.Image, full_size: tuple[int, int], data: bytes, long_side: int) -> int:
    """Bytes that decoding ``image`` (opened, not loaded; after ``draft``) holds at its peak: the picture in PIL's
    layout, what the format's decoder keeps beside it, a strip on its way to RGB and the reduced picture."""
    width, height = image.size
    cost = width * height * _bytes_per_pixel(image.mode) + _working_bytes(image.size, long_side)
    if image.format == "WEBP":
        cost += width * height * _WEBP_EXTRA_BYTES_PER_PIXEL
    elif isinstance(image, TiffImagePlugin.TiffImageFile):
        cost += _tiff_block_bytes(image)
    elif isinstance(image, JpegImagePlugin.JpegImageFile) and _jpeg_needs_coefficients(image, data):  # JPEG, MPO
        cost += _jpeg_coefficient_bytes(image, *full_size)
    return cost


def check_cpu_cost(image: ImageFile.ImageFile, data: bytes) -> None:
    """ImageRejected ``too_costly`` for the two shapes whose cost is time, not memory: a JPEG with more than
    ``MAX_JPEG_SCANS`` scans, a run-length BMP above ``MAX_BMP_RLE_PIXELS``."""
    if image.format in ("JPEG", "MPO"):
        check_jpeg_scans(data)
    elif image.format == "BMP" and any(tile[0] == "bmp_rle" for tile in image.tile):
        pixels = image.size[0] * image.size[1]
        if pixels > MAX_BMP_RLE_PIXELS:
            raise ImageRejected("too_costly", f"run-length BMP of {pixels} > {MAX_BMP_RLE_PIXELS} pixels")


def _bytes_per_pixel(mode: str) -> int:
    """PIL keeps every multi-band mode in 4 bytes a pixel (RGB too); single bands in their own width."""
    descriptor = ImageMode.getmode(mode)
    return 4 if len(descriptor.bands) > 1 else int(descriptor.typestr[-1])


def _working_bytes(size: tuple[int, int], long_side: int) -> int:
    factor_x, factor_y = _reduce_factors(size, long_side)
    return _WORKING_BYTES + math.ceil(size[0] / factor_x) * math.ceil(size[1] / factor_y) * 4


def _check_before_open(data: bytes, *, max_pixels: int, long_side: int, max_decode_bytes: int) -> None:
    """The check that cannot wait for ``Image.open``: PIL's WebP plugin makes libwebp's decoder (and its canvas) as
    it opens."""
    if sniff_image_type(data[:16]) == "webp":
        size = webp_canvas_size(data)
        if size is not None:
            check_dimensions(*size, max_pixels=max_pixels)
            cost = size[0] * size[1] * (4 + _WEBP_EXTRA_BYTES_PER_PIXEL) + _working_bytes(size, long_side)
            check_cost(cost, max_decode_bytes=max_decode_bytes)


def webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas a WebP declares (lossy, lossless or extended), read from its first 30 bytes; None if unreadable."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _tiff_block_bytes(image: TiffImagePlugin.TiffImageFile) -> int:
    """libtiff decodes a strip or a tile at a time into a buffer of its raw samples, beside PIL's picture: one strip
    of the whole height (RowsPerStrip = height) is a second copy, at the file's bit depth. PIL reads uncompressed
    strips itself, with no such buffer."""
    tags = image.tag_v2
    width, height = image.size
    compression = _tag(tags, 259, 1)
    if compression == 1 and not TiffImagePlugin.READ_LIBTIFF:
        return 0
    bits, samples = _tag(tags, 258, 1, max), max(_tag(tags, 277, 1), 1)
    if 322 in tags and 323 in tags:
        block = _tag(tags, 322, 0) * _tag(tags, 323, 0)
    else:
        block = width * min(_tag(tags, 278, height), height)
    if _tag(tags, 262, 0) == 6 or compression in (6, 7):
        return block * 4  # YCbCr and JPEG-in-TIFF are decoded through libtiff's RGBA interface
    return math.ceil(block * samples * bits / 8)


def _tag(tags: Mapping[int, object], key: int, default: int, pick: Callable[[list[int]], int] = min) -> int:
    """A numeric TIFF tag as one int (``pick`` of its values when it has several); ImageRejected if not numeric."""
    value = tags.get(key, default)
    values = list(value) if isinstance(value, tuple) else [value]
    try:
        return pick([int(v) for v in values]) if values else default  # type: ignore[arg-type]  # int() may refuse it: caught
    except (TypeError, ValueError) as err:
        raise ImageRejected("corrupt_image", f"TIFF tag {key}: {value!r:.40}") from err


def check_jpeg_scans(data: bytes) -> None:
    """ImageRejected ``too_costly`` for a JPEG with more than ``MAX_JPEG_SCANS`` scans. Counts every start-of-scan
    marker in the file (entropy-coded data never holds one: its 0xFF bytes are stuffed), so it may count high but
    never low."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageRejected("too_costly", f"{scans} JPEG scans > {MAX_JPEG_SCANS}")


def _jpeg_needs_coefficients(image: JpegImagePlugin.JpegImageFile, data: bytes) -> bool:
    """libjpeg keeps the whole picture's DCT coefficients, at full size whatever the draft, when a JPEG comes in
    more than one scan: progressive, or sequential with components in scans of their own."""
    if image.info.get("progressive"):
        return True
    components = _first_scan_components(data)
    return components is None or components < len(image.layer)


def _first_scan_components(data: bytes, max_segments: int = 1024) -> int | None:
    """How many components the first scan holds, walking the segments before it; None when it is not found."""
    at = 2
    for _ in range(max_segments):
        while at < len(data) and data[at] == 0xFF and at + 1 < len(data) and data[at + 1] == 0xFF:
            at += 1  # fill bytes
        if at + 4 >= len(data) or data[at] != 0xFF:
            return None
        if data[at + 1] == 0xDA:
            return data[at + 4]
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _jpeg_coefficient_bytes(image: JpegImagePlugin.JpegImageFile, width: int, height: int) -> int:
    """The coefficient arrays libjpeg allocates: 64 16-bit coefficients a block, blocks padded to whole MCUs."""
    layers = image.layer  # (id, horizontal sampling, vertical sampling, table)
    h_max = max((h for _, h, _, _ in layers), default=1) or 1
    v_max = max((v for _, _, v, _ in layers), default=1) or 1
    total = 0
    for _, h, v, _ in layers:
        blocks_w = math.ceil(math.ceil(width * h / h_max) / 8)
        blocks_h = math.ceil(math.ceil(height * v / v_max) / 8)
        total += _round_up(blocks_w, max(h, 1)) * _round_up(blocks_h, max(v, 1)) * 128
    return total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# -- to RGB, reduced strip by strip ----------------------------------------------------------------------------------
def _reduced_rgb(image: Image.Image, long_side: int) -> Image.Image:
    """The decoded picture in RGB, box-reduced by whole factors towards twice ``long_side`` (what ``thumbnail``'s
    reducing gap would do), converted one strip at a time so no full-size copy is made in a wider mode."""
    width, height = image.size
    factor_x, factor_y = _reduce_factors(image.size, long_side)
    convert = _rgb_converter(image)
    rows = factor_y * max(1, _STRIP_PIXELS // (width * factor_y))
    if rows >= height and factor_x == factor_y == 1:
        return convert(image)
    reduced = Image.new("RGB", (math.ceil(width / factor_x), math.ceil(height / factor_y)))
    for top in range(0, height, rows):
        strip = convert(image.crop((0, top, width, min(height, top + rows))))
        reduced.paste(strip.reduce((factor_x, factor_y)) if factor_x * factor_y > 1 else strip, (0, top // factor_y))
    return reduced


def _reduce_factors(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """Whole factors that leave at least twice the final size on each side, as ``thumbnail`` would reduce by."""
    scale = long_side / max(size)
    if scale >= 1:
        return 1, 1
    factor_x, factor_y = (max(1, int(side / max(1, round(side * scale)) / 2)) for side in size)
    return factor_x, factor_y


def _rgb_converter(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """A function from a strip of ``image`` to RGB, with what it needs from the whole picture (a 16-bit range)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the image's own range instead of clipping.
        low, high = (float(v) for v in image.getextrema())  # type: ignore[arg-type]  # one band: (low, high)
        return lambda strip: _scaled_grey(strip, low, high)
    if mode == "P" and "transparency" in image.info:
        return _palette_over_white(image)
    if mode in ("RGBA", "LA", "PA"):
        return _over_white
    return lambda strip: strip.convert("RGB")


def _palette_over_white(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """For a palette with transparent entries: the palette itself put over white once, so each strip takes one
    lookup (the same colours as putting every pixel over white)."""
    index = image.crop((0, 0, 256, 1))  # keeps the palette and the transparency; pixels beyond the image are 0
    index.putdata(range(256))
    palette = _over_white(index).tobytes()

    def convert(strip: Image.Image) -> Image.Image:
        strip.putpalette(palette, "RGB")
        strip.info.pop("transparency", None)
        return strip.convert("RGB")

    return convert


def _scaled_grey(strip: Image.Image, low: float, high: float) -> Image.Image:
    array = np.asarray(strip, dtype=np.float64)  # a strip: 8 bytes a pixel of a million pixels at most
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


def _over_white(strip: Image.Image) -> Image.Image:
    """Transparent pixels over white, as they are shown in a feed."""
    rgba = strip.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# -- torchvision.io ---------------------------------------------------------------------------------------------------
def probe_jpeg(data: bytes, *, max_pixels: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> bool:
    """True when ``data`` is a JPEG within the limits, to be decoded by ``decode_jpegs``; False for any other
    format, and for a JPEG that ``decode_jpegs`` would decode at a cost above ``max_decode_bytes`` (it decodes at
    full size; PIL decodes it reduced by the DCT): decode those with ``decode_image``. Reads the header only; raises
    ImageRejected like ``decode_image``."""
    if sniff_image_type(data[:16]) != "jpeg":
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.mode == "CMYK":
                return False  # nvJPEG's RGB conversion of CMYK is not PIL's; leave those to PIL
            if not isinstance(image, JpegImagePlugin.JpegImageFile):
                return False  # PIL did not take it for a JPEG after all: decode_image decides
            coefficients = _jpeg_coefficient_bytes(image, width, height) if _jpeg_needs_coefficients(image, data) else 0
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", "unrecognised image data") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected("corrupt_image", str(err)) from err
    check_dimensions(width, height, max_pixels=max_pixels)
    check_jpeg_scans(data)
    # uint8 RGB at full size, and the float copy ``downscale`` interpolates from
    return width * height * 3 * (1 + 4) + coefficients <= max_decode_bytes


def decode_jpegs(datas: list[bytes], device: torch.device, *, long_side: int) -> list[torch.Tensor | ImageRejected]:
    """JPEGs -> RGB (3, H, W) uint8 tensors on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU), EXIF orientation
    applied, downscaled so the long side is at most ``long_side``. One batched call; when it fails, each image alone,
    so one corrupt file is rejected and the others go on. Give it only what ``probe_jpeg`` accepted."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    decoded: list[torch.Tensor | ImageRejected]
    try:
        decoded = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        decoded = [_decode_one(tensor, device) for tensor in tensors]
    return [image if isinstance(image, ImageRejected) else downscale(image, long_side) for image in decoded]


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | ImageRejected:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image: torch.Tensor = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return image
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
    import torch
    from torch.nn.functional import interpolate

    resized = interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)
