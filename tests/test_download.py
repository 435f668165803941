"""Image downloads against a real server on loopback: limits are enforced before anything reaches the blob store."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from deeptarget.core.errors import ImageRejected
from deeptarget.runtime.app_server import AppServer
from deeptarget.scraper.download import ImageDownloader
from deeptarget.store.blobs import BlobStore
from tests.helpers import noise_jpeg


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")  # compresses to a few KB: a decompression bomb in miniature
    return buffer.getvalue()


@pytest.fixture
async def server():
    files = {
        "bomb.png": (png(6000, 4000), "image/png"),
        "ok.jpg": (noise_jpeg(), "image/jpeg"),
        "big.jpg": (noise_jpeg() + b"\0" * 300_000, "image/jpeg"),
        "page.jpg": (b"<html></html>", "text/html"),
    }

    async def serve(request: web.Request) -> web.Response:
        body, content_type = files[request.match_info["name"]]
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    async with AppServer(app) as running:
        yield running.url


@pytest.mark.parametrize(
    ("name", "reason"),
    [("bomb.png", "too_many_pixels"), ("big.jpg", "too_large"), ("page.jpg", "not_an_image")],
)
async def test_limits_reject_before_storing(server: str, tmp_path: Path, name: str, reason: str) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    async with aiohttp.ClientSession() as session:
        download = ImageDownloader(session, blobs, max_bytes=200_000, max_pixels=10_000_000)
        with pytest.raises(ImageRejected) as err:
            await download(f"{server}/{name}")
        assert err.value.reason == reason
        sha, size = await download(f"{server}/ok.jpg")
    assert sha in blobs and size == len(noise_jpeg())
    stored = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(stored) == 1  # the rejected ones left nothing behind, not even a temporary file


@pytest.mark.parametrize("url", ["http://[::1", "ftp://example.com/a.jpg", "http://", "not a url", "http://a b/c.jpg"])
async def test_a_malformed_url_is_that_posts_rejection_not_the_crawls_end(
    server: str, tmp_path: Path, url: str
) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    async with aiohttp.ClientSession() as session:
        download = ImageDownloader(session, blobs, max_bytes=200_000, retries=0)
        with pytest.raises(ImageRejected) as err:
            await download(url)
        assert err.value.reason in ("bad_url", "download_failed")
        sha, _ = await download(f"{server}/ok.jpg")  # the next one goes on as usual
    assert sha in blobs
