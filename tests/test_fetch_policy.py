"""Where the scraper may fetch from (issue 12, H1): only allowed hosts, never a private address it was not told to
use, checked again at every redirect hop and when the connection is made; a refusal says nothing of the network."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deeptarget.core.errors import ImageRejected
from deeptarget.runtime.app_server import AppServer
from deeptarget.scraper.download import ImageDownloader
from deeptarget.scraper.fetch_policy import FetchPolicy, FetchRefused
from deeptarget.store.blobs import BlobStore
from tests.conftest import make_settings
from tests.helpers import noise_jpeg


def policy(tmp_path: Path, **settings: object) -> FetchPolicy:
    return FetchPolicy.from_settings(make_settings(tmp_path / "data", **settings))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",  # the Redis port
        "http://127.0.0.1/x.jpg",
        "http://0x7f000001/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://[::1]/x.jpg",
        "http://10.0.0.5/x.jpg",
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "http://100.64.0.1/x.jpg",  # CGNAT
        "http://224.0.0.1/x.jpg",
        "http://user:pw@scontent.cdninstagram.com/x.jpg",
        "http://scontent.cdninstagram.com:6379/x.jpg",
        "http://evil.example/x.jpg",
        "file:///etc/passwd",
        "gopher://scontent.cdninstagram.com/",
        "http://scontent.cdninstagram.com:99999/x.jpg",
        "http:///x.jpg",
    ],
)
def test_urls_outside_the_policy_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        policy(tmp_path, source_url="https://graph.facebook.com/v21.0").check(url)
    assert "6379" not in str(refused.value) and "refused" not in str(refused.value)


def test_the_source_feeds_and_named_hosts_are_allowed(tmp_path: Path) -> None:
    rules = policy(tmp_path, source_url="http://127.0.0.1:8700", jsonl_feeds=["https://partner.example/feed.jsonl"],
                   image_hosts=["*.cdninstagram.com", "10.1.2.3", "images.internal:8080"])  # fmt: skip
    for url in ("http://127.0.0.1:8700/media/1.jpg", "https://scontent-ams2-1.cdninstagram.com/v/t51/x.jpg",
                "https://cdninstagram.com/x.jpg", "http://10.1.2.3/x.jpg", "http://images.internal:8080/a.jpg",
                "https://partner.example/pic.jpg"):  # fmt: skip
        rules.check(url)
    with pytest.raises(FetchRefused):
        rules.check("http://127.0.0.1:8701/media/1.jpg")  # the source's host, another port


@pytest.fixture
async def two_servers():
    """An allowed server that redirects, and an 'internal' one that must never be reached."""
    internal_hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        internal_hits.append(request.path)
        return web.Response(body=noise_jpeg(), content_type="image/jpeg")

    inside = web.Application()
    inside.router.add_get("/{tail:.*}", internal)
    async with AppServer(inside) as internal_server:

        async def allowed(request: web.Request) -> web.Response:
            if request.path == "/ok.jpg":
                return web.Response(body=noise_jpeg(), content_type="image/jpeg")
            if request.path == "/hop.jpg":
                raise web.HTTPFound("/ok.jpg")
            if request.path == "/loop.jpg":
                raise web.HTTPFound("/loop.jpg")
            raise web.HTTPFound(f"{internal_server.url}/secret.jpg")

        outside = web.Application()
        outside.router.add_get("/{tail:.*}", allowed)
        async with AppServer(outside) as allowed_server:
            yield allowed_server.url, internal_server.url, internal_hits


async def test_every_redirect_hop_is_checked(tmp_path: Path, two_servers: tuple[str, str, list[str]]) -> None:
    allowed, internal, hits = two_servers
    rules = policy(tmp_path, source_url=allowed)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=rules.resolver())) as session:
        download = ImageDownloader(session, BlobStore(tmp_path / "blobs"), max_bytes=1_000_000, retries=0,
                                   policy=rules)  # fmt: skip
        sha, _ = await download(f"{allowed}/hop.jpg")  # a redirect on the same host is fine
        assert sha
        for url, reason in ((f"{allowed}/to-inside.jpg", "not_allowed"), (f"{internal}/x.jpg", "not_allowed"),
                            (f"{allowed}/loop.jpg", "too_many_redirects")):  # fmt: skip
            with pytest.raises(ImageRejected) as err:
                await download(url)
            assert err.value.reason == reason
    assert hits == []  # the internal server never saw a request


async def test_a_name_that_resolves_to_loopback_is_refused_when_connecting(tmp_path: Path) -> None:
    """'localhost' passes a pattern check ('*' allows any host by name) but resolves to 127.0.0.1: the resolver the
    connection uses refuses it, the way a rebinding name would be refused."""
    rules = policy(tmp_path, source_url="https://graph.facebook.com", image_hosts=["*"])
    rules.check("http://localhost/x.jpg")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=rules.resolver())) as session:
        download = ImageDownloader(session, BlobStore(tmp_path / "blobs"), max_bytes=1_000_000, retries=0,
                                   policy=rules)  # fmt: skip
        with pytest.raises(ImageRejected) as err:
            await download("http://localhost/x.jpg")
    assert err.value.reason == "not_allowed" and "127.0.0.1" not in str(err.value)


async def test_naming_a_loopback_source_opens_that_port_only(tmp_path: Path) -> None:
    """Found by the attacker's re-test: with the source at http://localhost:<port> and image_hosts ["*"], the
    resolver let 'localhost' reach 127.0.0.1 on every port. Only the named port is the operator's choice."""
    hits: list[str] = []

    async def canary(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=noise_jpeg(), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", canary)
    async with AppServer(app) as source, AppServer(app) as other:
        rules = policy(tmp_path, source_url=f"http://localhost:{source.port}", image_hosts=["*"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=rules.resolver())) as session:
            download = ImageDownloader(session, BlobStore(tmp_path / "blobs"), max_bytes=1_000_000, retries=0,
                                       policy=rules)  # fmt: skip
            await download(f"http://localhost:{source.port}/named.jpg")  # the source itself: allowed
            for url in (f"http://localhost:{other.port}/other.jpg", f"http://LOCALHOST.:{other.port}/other.jpg"):
                with pytest.raises(ImageRejected) as err:
                    await download(url)
                assert err.value.reason == "not_allowed", (url, err.value)
            # ports 80 and 443 pass the URL check ("*"), then the resolver refuses loopback for them
            for url in ("http://localhost/x.jpg", "https://localhost/x.jpg"):
                rules.check(url)
                with pytest.raises(ImageRejected) as err:
                    await download(url)
                assert err.value.reason == "not_allowed", (url, err.value)
    assert hits == ["/named.jpg"]
