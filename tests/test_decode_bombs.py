"""Decoding hostile images (issue 12, M5): a few bytes that declare a big picture cost what their format and bit
depth make them cost, bounded from the header, or are refused with a reason; ordinary photos decode as before.

The hostile images are built here, in memory and fast: tiny bytes, 40M declared pixels (the most max_image_pixels
admits). Peak memory is measured in a subprocess, as the growth of its peak RSS around each decode (C allocations
are what matter, and tracemalloc does not see them).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps

from deeptarget.core.errors import ImageRejected
from deeptarget.core.settings import Settings
from deeptarget.models.decode import (
    DEFAULT_MAX_DECODE_BYTES,
    decode_cost,
    decode_image,
    decode_jpegs,
    probe_jpeg,
)
from deeptarget.query.service import QueryService
from tests.conftest import make_settings

SIDE = 6324  # 6324^2 = 39.99M pixels: the largest square that max_image_pixels admits
LIMITS = {"max_pixels": 40_000_000, "long_side": 640}
MB = 1024 * 1024


# -- hostile images --------------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def zeros_zlib(length: int, chunk: int = MB) -> bytes:
    """A zlib stream of ``length`` zero bytes, made without compressing them all: after a full flush the compressor
    forgets what came before, so every further chunk compresses to the same bytes."""
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    full, rest = divmod(length, chunk)
    once = body.compress(bytes(chunk)) + body.flush(zlib.Z_FULL_FLUSH) if full else b""
    tail = body.compress(bytes(rest)) + body.flush()
    adler = ((length % 65521) << 16) | 1  # adler32 of zeros: a stays 1, b grows by 1 a byte
    return b"\x78\xda" + once * full + tail + struct.pack(">I", adler)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_ihdr(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))


def png_idat(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    return png_chunk(b"IDAT", zeros_zlib(height * (1 + (width * channels * bit_depth + 7) // 8)))


def png(width: int, height: int, bit_depth: int, colour_type: int, before_idat: tuple[bytes, ...] = ()) -> bytes:
    """A black PNG of any size and depth, written chunk by chunk."""
    ihdr, idat = png_ihdr(width, height, bit_depth, colour_type), png_idat(width, height, bit_depth, colour_type)
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(before_idat) + idat + png_chunk(b"IEND", b"")


def png_palette_transparent(width: int, height: int) -> bytes:
    return png(width, height, 8, 3, (png_chunk(b"PLTE", bytes(range(48))), png_chunk(b"tRNS", b"\x00\x80")))


def png_text(chunks: int, inflated: int = MB - 64) -> bytes:
    """A small PNG with an ICC profile and ``chunks`` zTXt chunks that inflate to about 1 MB each."""
    text = zeros_zlib(inflated)
    icc = png_chunk(b"iCCP", b"icc\x00\x00" + text)
    return png(64, 64, 8, 2, (icc, *(png_chunk(b"zTXt", b"c%d\x00\x00" % i + text) for i in range(chunks))))


def apng(width: int, height: int, frames: int) -> bytes:
    """An APNG: a big first frame, disposed to the background, then many 1x1 frames."""

    def fctl(seq: int, w: int, h: int, dispose: int) -> bytes:
        return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, 1, 10, dispose, 0))

    pixel = zlib.compress(bytes(5))
    tail = b"".join(
        fctl(2 * i - 1, 1, 1, 0) + png_chunk(b"fdAT", struct.pack(">I", 2 * i) + pixel) for i in range(1, frames)
    )
    head = png_ihdr(width, height, 8, 6) + png_chunk(b"acTL", struct.pack(">II", frames, 0)) + fctl(0, width, height, 1)
    return b"\x89PNG\r\n\x1a\n" + head + png_idat(width, height, 8, 6) + tail + png_chunk(b"IEND", b"")


def webp_lossless_flat(width: int, height: int) -> bytes:
    """A flat lossless WebP of any size in 38 bytes: one colour costs no bits a pixel, so a small picture's
    bitstream with its size field changed is a valid big one."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (120, 30, 200)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def webp_big_canvas(width: int, height: int, frames: int = 50) -> bytes:
    """An animated WebP of 16x16 frames on a big canvas: libwebp allocates the whole canvas, twice."""
    images = [Image.new("RGB", (16, 16), (i * 40 % 256, 30, 200)) for i in range(frames)]
    data = bytearray(encode(images[0], "WEBP", save_all=True, append_images=images[1:], lossless=True))
    assert data[12:16] == b"VP8X"
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def lzw_flat(pixels: int, colour: int = 1, min_size: int = 2) -> bytes:
    """GIF LZW of ``pixels`` pixels of one colour: each code is a run one longer than the last (~30 KB for 40M)."""
    clear, end = 1 << min_size, (1 << min_size) + 1
    value = count = 0
    out = bytearray()

    def put(code: int, width: int) -> None:
        nonlocal value, count
        value |= code << count
        count += width
        while count >= 8:
            out.append(value & 0xFF)
            value >>= 8
            count -= 8

    left, width = pixels, min_size + 1
    while left:
        put(clear, min_size + 1)
        width, next_code, longest = min_size + 1, end + 1, 1
        while left and next_code < 4095:
            run = min(longest, left)
            put(colour if run == 1 else end + run - 1, width)
            left -= run
            if run == longest:
                longest, next_code = longest + 1, next_code + 1
                if next_code > (1 << width) and width < 12:  # where the decoder, one code behind, widens
                    width += 1
    put(end, width)
    if count:
        out.append(value & 0xFF)
    blocks = b"".join(bytes([len(out[i : i + 255])]) + out[i : i + 255] for i in range(0, len(out), 255))
    return bytes([min_size]) + blocks + b"\x00"


def gif(width: int, height: int, frames: int) -> bytes:
    """A GIF: one big flat frame with a transparent colour, then many 1x1 frames."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF1, 0, 0) + bytes(range(12))
    first = b"\x21\xf9\x04\x01\x0a\x00\x00\x00\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    small = b"\x21\xf9\x04\x00\x0a\x00\x00\x00\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + lzw_flat(1)
    return head + first + lzw_flat(width * height) + small * (frames - 1) + b"\x3b"


def tiff_one_strip(width: int, height: int, bits: int = 16, samples: int = 4) -> bytes:
    """A deflated TIFF in one strip (RowsPerStrip = height): libtiff's strip buffer is the whole raw picture."""
    strip = zeros_zlib(width * height * samples * bits // 8)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 0), (259, 3, 8), (262, 3, 2), (273, 4, 0),
               (277, 3, samples), (278, 4, height), (279, 4, len(strip)), (284, 3, 1)]  # fmt: skip
    entries += [(338, 3, 2)] if samples == 4 else []  # the fourth sample is alpha
    bits_at = 8 + 2 + 12 * len(entries) + 4
    strip_at = bits_at + 2 * samples
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, value in entries:
        count = samples if tag == 258 else 1
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return bytes(out + b"\x00\x00\x00\x00" + struct.pack(f"<{samples}H", *[bits] * samples) + strip)


def bmp_rle(width: int, height: int, rows: bytes, bits: int) -> bytes:
    """A run-length BMP (RLE8 or RLE4) with a palette: a few bytes a row."""
    colours = 1 << bits
    palette = b"".join(bytes([i * 16 % 256, 255 - i, i // 2, 0]) for i in range(colours))
    pixels = rows + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    compression = 1 if bits == 8 else 2
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def bmp_rle8(width: int, height: int) -> bytes:
    return bmp_rle(
        width, height, (b"".join(bytes([min(255, width - x), 1]) for x in range(0, width, 255)) + b"\0\0") * height, 8
    )


def bmp_rle4(width: int, height: int) -> bytes:
    """Runs of 255 two-colour pixels: PIL's Python decoder takes each pixel in a loop of its own."""
    return bmp_rle(
        width,
        height,
        (b"".join(bytes([min(255, width - x), 0x12]) for x in range(0, width, 255)) + b"\0\0") * height,
        4,
    )


def bmp_rle_end_of_lines(width: int, height: int) -> bytes:
    """One pixel then end-of-line, every row: 4 bytes a row, the rest padded by PIL one byte at a time."""
    return bmp_rle(width, height, b"\x01\x05\x00\x00" * height, 8)


def jpeg_flat(width: int, height: int, **kwargs: object) -> bytes:
    return encode(Image.new("RGB", (width, height), (120, 30, 200)), "JPEG", quality=50, **kwargs)


def with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with another size in its frame header: what is refused from the header needs no real scans."""
    at = next(jpeg.index(m) for m in (b"\xff\xc0", b"\xff\xc2") if m in jpeg)
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def jpeg_many_scans(copies: int) -> bytes:
    """A progressive JPEG whose shortest scan comes ``copies`` times: each copy is another pass over every block."""
    data = jpeg_flat(256, 256, progressive=True)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    ends = [*starts[1:], data.rindex(b"\xff\xd9")]
    start, stop = min(zip(starts, ends, strict=True), key=lambda scan: scan[1] - scan[0])
    return data[:stop] + data[start:stop] * copies + data[stop:]


def mpo(width: int, height: int) -> bytes:
    """A multi-picture JPEG (format MPO): before, it was decoded at full size, not reduced by the DCT."""
    images = [Image.new("RGB", (width, height), (i * 60, 30, 200)) for i in range(2)]
    return encode(images[0], "MPO", save_all=True, append_images=images[1:], quality=50)


# name: (builder, reason). All but the last two were decoded before: 0.6 to 0.8 GB, or 2 to 4 s of CPU, each.
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "webp_flat_40M": (lambda: webp_lossless_flat(SIDE, SIDE), "too_costly"),
    "webp_canvas_40M": (lambda: webp_big_canvas(SIDE, SIDE), "too_costly"),
    "tiff_16bit_rgba_one_strip": (lambda: tiff_one_strip(SIDE, SIDE), "too_costly"),
    "jpeg_progressive_444_40M": (
        lambda: with_size(jpeg_flat(64, 64, progressive=True, subsampling=0), SIDE, SIDE),
        "too_costly",
    ),
    "jpeg_many_scans": (lambda: jpeg_many_scans(500), "too_costly"),
    "bmp_rle8_40M": (lambda: bmp_rle8(SIDE, SIDE), "too_costly"),
    "bmp_rle4_40M": (lambda: bmp_rle4(SIDE, SIDE), "too_costly"),
    "bmp_rle_end_of_lines": (lambda: bmp_rle_end_of_lines(SIDE, SIDE), "too_costly"),
    "webp_flat_16383": (lambda: webp_lossless_flat(16383, 16383), "too_many_pixels"),
    "png_text_over_64MB": (lambda: png_text(70), "corrupt_image"),  # PIL's own limit on text chunks
}

# Decoded within the bound. Before, the first seven held 0.2 to 0.9 GB each; the text chunks are PIL's to bound.
DECODED: dict[str, Callable[[], bytes]] = {
    "png_16bit_grey_40M": lambda: png(SIDE, SIDE, 16, 0),
    "png_palette_transparent_40M": lambda: png_palette_transparent(SIDE, SIDE),
    "gif_40M_5000_frames": lambda: gif(SIDE, SIDE, 5000),
    "apng_16M_2000_frames": lambda: apng(4000, 4000, 2000),
    "mpo_40M": lambda: mpo(SIDE, SIDE),
    "webp_flat_9M": lambda: webp_lossless_flat(3000, 3000),
    "tiff_16bit_rgba_one_strip_9M": lambda: tiff_one_strip(3000, 3000),
    "png_text_60MB": lambda: png_text(60),
}


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_images_are_refused_from_the_header_with_a_reason(name: str) -> None:
    build, reason = REFUSED[name]
    data = build()
    assert len(data) < 512 * 1024  # tiny uploads, all of them
    with pytest.raises(ImageRejected) as err:
        decode_image(data, **LIMITS)
    assert err.value.reason == reason


# Peak RSS growth of a subprocess around each decode. /proc/self/clear_refs "5" resets the peak; a fixed mmap
# threshold gives freed blocks back at once, so one decode's leftovers do not hide the next one's peak.
MEASURE = r"""
import ctypes, gc, json, sys
from deeptarget.models.decode import decode_image
libc = ctypes.CDLL("libc.so.6")
def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))
results = {}
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = status("VmRSS:")
    shape = decode_image(data, **json.loads(sys.argv[1])).shape
    results[path.rsplit("/", 1)[1]] = {"peak": status("VmHWM:") - base, "shape": list(shape)}
print(json.dumps(results))
"""


def test_hostile_images_that_are_decoded_stay_within_their_estimated_cost(tmp_path: Path) -> None:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    paths, estimates = [], {}
    for name, build in DECODED.items():
        data = build()
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
        image = Image.open(io.BytesIO(data))
        full_size = image.size
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (LIMITS["long_side"],) * 2)
        estimates[name] = decode_cost(image, full_size, data, LIMITS["long_side"])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    answer = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(LIMITS), *map(str, paths)], env=env,
                            capture_output=True, text=True, timeout=50, check=True)  # fmt: skip
    measured = json.loads(answer.stdout.splitlines()[-1])
    text = measured.pop("png_text_60MB")
    assert text["peak"] < 80 * MB and text["shape"] == [64, 64, 3]  # PIL keeps at most 64 MB of text chunks
    for name, result in measured.items():
        peak = result["peak"]
        assert peak < 300 * MB, (name, peak // MB)
        assert peak <= estimates[name] + 16 * MB, (name, peak // MB, estimates[name] // MB)
        assert estimates[name] <= DEFAULT_MAX_DECODE_BYTES
        assert max(result["shape"][:2]) == LIMITS["long_side"]


# -- ordinary photos decode as before -------------------------------------------------------------------------------
def reference(data: bytes, long_side: int) -> np.ndarray:
    """How images were decoded before: whole, converted at full size, then reduced (the old code, as an oracle)."""
    image = Image.open(io.BytesIO(data))
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (long_side, long_side))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        image = Image.fromarray(((array - low) * (255.0 / (high - low))).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    image.thumbnail((long_side, long_side), Image.Resampling.BILINEAR)
    return np.asarray(image)


PHOTOS = ["jpeg", "jpeg_progressive_large", "jpeg_rotated_large", "jpeg_cmyk", "mpo_large", "png", "png_large",
          "png_16bit", "png_16bit_large", "png_rgba", "png_rgba_large", "png_palette_transparent", "png_grey_alpha",
          "png_1bit_large", "gif", "gif_large", "webp", "webp_lossless_rgba", "tiff_large", "tiff_16bit",
          "bmp"]  # fmt: skip


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """skimage's sample photos in each format and mode; "large" ones are reduced before they are resized."""
    astronaut, chelsea, coffee = (Image.fromarray(f()) for f in (skimage.data.astronaut, skimage.data.chelsea,
                                                                 skimage.data.coffee))  # fmt: skip
    camera16 = Image.fromarray(skimage.data.camera().astype(np.uint16) * 200 + 300)
    large = astronaut.resize((1700, 1500), Image.Resampling.BICUBIC)
    alpha = np.asarray(astronaut.convert("RGBA")).copy()
    alpha[..., 3] = np.linspace(0, 255, alpha.shape[1]).astype(np.uint8)[None, :]
    rgba = Image.fromarray(alpha)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    fast = {"compress_level": 1}
    made = {
        "jpeg": encode(astronaut, "JPEG", quality=90),
        "jpeg_progressive_large": encode(large, "JPEG", progressive=True),
        "jpeg_rotated_large": encode(large, "JPEG", exif=rotated),
        "jpeg_cmyk": encode(coffee.convert("CMYK"), "JPEG"),
        "mpo_large": encode(large, "MPO", save_all=True, append_images=[astronaut]),
        "png": encode(chelsea, "PNG", **fast),
        "png_large": encode(large, "PNG", **fast),
        "png_16bit": encode(camera16, "PNG", **fast),
        "png_16bit_large": encode(camera16.resize((1700, 1700)), "PNG", **fast),
        "png_rgba": encode(rgba, "PNG", **fast),
        "png_rgba_large": encode(rgba.resize((1700, 1700)), "PNG", **fast),
        "png_palette_transparent": encode(astronaut.convert("P"), "PNG", transparency=5, **fast),
        "png_grey_alpha": encode(rgba.convert("LA"), "PNG", **fast),
        "png_1bit_large": encode(large.convert("1"), "PNG", **fast),
        "gif": encode(chelsea, "GIF"),
        "gif_large": encode(large.convert("P"), "GIF"),
        "webp": encode(coffee, "WEBP"),
        "webp_lossless_rgba": encode(rgba, "WEBP", lossless=True, method=0),
        "tiff_large": encode(large, "TIFF", compression="packbits"),
        "tiff_16bit": encode(camera16, "TIFF"),
        "bmp": encode(chelsea, "BMP"),
    }
    assert sorted(made) == sorted(PHOTOS)
    return made


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("long_side", [200, 640])
def test_photos_decode_as_before(photos: dict[str, bytes], name: str, long_side: int) -> None:
    data = photos[name]
    rgb = decode_image(data, max_pixels=LIMITS["max_pixels"], long_side=long_side)
    expected = reference(data, long_side)
    assert rgb.shape == expected.shape and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).mean() < 0.5


def test_a_phone_sized_webp_is_still_decoded() -> None:
    assert decode_image(webp_lossless_flat(4032, 3024), **LIMITS).shape == (480, 640, 3)  # 12 megapixels


# -- the device decoder, the setting, the query path ----------------------------------------------------------------
def test_device_decoder_takes_only_jpegs_it_can_decode_within_the_bound() -> None:
    photo = encode(Image.fromarray(skimage.data.astronaut()), "JPEG")
    assert probe_jpeg(photo, max_pixels=LIMITS["max_pixels"])
    (tensor,) = decode_jpegs([photo], torch.device("cpu"), long_side=256)
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (3, 256, 256)
    # At full size (as torchvision decodes) 40M pixels would hold 0.6 GB: left to PIL, which decodes it reduced.
    big = jpeg_flat(SIDE, SIDE)
    assert not probe_jpeg(big, max_pixels=LIMITS["max_pixels"])
    assert decode_image(big, **LIMITS).shape == (640, 640, 3)
    with pytest.raises(ImageRejected) as err:
        probe_jpeg(jpeg_many_scans(500), max_pixels=LIMITS["max_pixels"])
    assert err.value.reason == "too_costly"


def test_the_setting_defaults_to_the_decoders_bound_and_reaches_image_queries(tmp_path: Path) -> None:
    assert Settings().max_decode_bytes == DEFAULT_MAX_DECODE_BYTES
    service = QueryService(make_settings(tmp_path / "data", max_decode_bytes=32 * MB))
    with pytest.raises(ImageRejected) as err:
        service.embed_image(encode(Image.new("RGBA", (3000, 3000)), "PNG"))  # 36 MB in PIL
    assert err.value.reason == "too_costly"
