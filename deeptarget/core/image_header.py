"""What an image's first bytes and declared size say, before anything decodes it: the checks the scraper makes on a
download and the workers repeat before decoding. Pure Python, so a scraper host needs neither PIL nor torch for them."""

from __future__ import annotations

from deeptarget.core.errors import ImageRejected

__all__ = ["check_dimensions", "check_pixels", "sniff_image_type"]

# Magic bytes of the formats models/decode.py accepts; a download is checked against these before it is stored.
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
