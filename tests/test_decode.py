from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deeptarget.core.errors import ImageRejected
from deeptarget.core.image_header import sniff_image_type
from deeptarget.models.decode import decode_image, decode_jpegs, probe_jpeg

LIMITS = {"max_pixels": 4_000_000, "long_side": 256}


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb_within_the_long_side(photo: Image.Image, fmt: str) -> None:
    rgb = decode_image(encode(photo, fmt), **LIMITS)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) <= 256


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    image = (
        Image.new("RGB", (64, 48), (200, 30, 30)).convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 13).astype(np.uint16))
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    rgb = decode_image(encode(image, fmt), **LIMITS)
    assert rgb.shape == (48, 64, 3)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert decode_image(encode(image, "PNG"), **LIMITS)[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = decode_image(encode(photo, "JPEG", exif=exif), **LIMITS)
    assert rgb.shape[0] > rgb.shape[1]  # the 400x300 landscape is shown as portrait


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"<!doctype html><html>not a picture</html>", "not_an_image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "not_an_image"),
    ],
)
def test_garbage_is_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as err:
        decode_image(data, **LIMITS)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected(photo: Image.Image) -> None:
    data = encode(photo, "JPEG")
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) // 2], **LIMITS)
    assert err.value.reason in ("truncated_image", "corrupt_image")


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(Image.new("L", (5000, 1000)), "PNG")  # compresses to a few KB: a decompression bomb in miniature
    with pytest.raises(ImageRejected) as err:
        decode_image(big, max_pixels=4_000_000, long_side=256)
    assert err.value.reason == "too_many_pixels"


def test_magic_bytes() -> None:
    assert sniff_image_type(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "jpeg"
    assert sniff_image_type(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_type(b"<!doctype html>") is None


# -- torchvision.io decoding (nvJPEG on CUDA; the same code on CPU here) -------------------------------------------
CPU = torch.device("cpu")


def test_device_decoder_matches_pil_in_shape_orientation_and_pixels(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    datas = [encode(photo, "JPEG", quality=95), encode(photo, "JPEG", quality=95, exif=exif)]
    assert all(probe_jpeg(d, max_pixels=LIMITS["max_pixels"]) for d in datas)
    upright, rotated = decode_jpegs(datas, CPU, long_side=256)
    assert isinstance(upright, torch.Tensor) and isinstance(rotated, torch.Tensor)
    assert upright.dtype == torch.uint8 and tuple(upright.shape) == (3, 192, 256)
    assert tuple(rotated.shape) == (3, 256, 192)
    smooth = np.asarray(photo.resize((40, 30)).resize((400, 300)))  # noise does not survive resampling; this does
    data = encode(Image.fromarray(smooth), "JPEG", quality=95)
    on_device = decode_jpegs([data], CPU, long_side=256)[0]
    assert isinstance(on_device, torch.Tensor)
    difference = np.abs(on_device.permute(1, 2, 0).numpy().astype(int) - decode_image(data, **LIMITS).astype(int))
    assert difference.mean() < 4


def test_device_decoder_rejects_a_corrupt_jpeg_and_decodes_the_rest(photo: Image.Image) -> None:
    good = encode(photo, "JPEG")
    outcomes = decode_jpegs([good, good[: len(good) // 3], good], CPU, long_side=256)
    assert isinstance(outcomes[0], torch.Tensor) and isinstance(outcomes[2], torch.Tensor)
    assert isinstance(outcomes[1], ImageRejected) and outcomes[1].reason in ("truncated_image", "corrupt_image")


def test_probe_leaves_other_formats_to_pil_and_checks_limits(photo: Image.Image) -> None:
    assert not probe_jpeg(encode(photo, "PNG"), max_pixels=LIMITS["max_pixels"])
    assert not probe_jpeg(encode(photo.convert("CMYK"), "JPEG"), max_pixels=LIMITS["max_pixels"])
    with pytest.raises(ImageRejected) as err:
        probe_jpeg(encode(photo, "JPEG"), max_pixels=1000)
    assert err.value.reason == "too_many_pixels"
