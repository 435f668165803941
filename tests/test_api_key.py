"""An empty key is no key (issue 12, C1): a real ``deeptarget serve`` process with ``DEEPTARGET_API_KEY`` empty or
blank keeps every write endpoint closed, and one with a short key refuses to start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from deeptarget.api.app import create_app
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import free_port
from tests.conftest import make_settings

WRITES = [("post", "/ingest"), ("post", "/index/snapshot"), ("delete", "/posts/some-post")]


@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
async def test_an_empty_or_blank_key_closes_every_write_endpoint(tmp_path: Path, redis_url: str, key: str) -> None:
    settings = make_settings(tmp_path / "data", redis_url, api_port=free_port())
    env = {**os.environ, **settings.to_env(), "DEEPTARGET_API_KEY": key}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deeptarget", "serve", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), timeout=60)
        assert b"deeptarget API at" in line, line
        url = f"http://127.0.0.1:{settings.api_port}"
        async with aiohttp.ClientSession() as http:
            for method, path in WRITES:
                for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "   "}):
                    async with http.request(method, url + path, data=b'{"id": "x"}', headers=headers) as response:
                        assert response.status == 403, (method, path, headers, response.status)
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=30)


@pytest.mark.parametrize("key", [" " + "k" * 20, "k" * 20 + "\t", "k" * 10 + "\x01" + "k" * 10])
def test_serve_refuses_a_key_no_http_client_could_send(tmp_path: Path, redis_url: str, key: str) -> None:
    """Re-test finding: a key with surrounding whitespace was accepted, yet HTTP strips it from the header."""
    settings = make_settings(tmp_path / "data", redis_url, api_port=free_port())
    env = {**os.environ, **settings.to_env(), "DEEPTARGET_API_KEY": key}
    done = subprocess.run([sys.executable, "-m", "deeptarget", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0 and "no HTTP client can send" in done.stderr
    assert "k" * 10 not in done.stderr + done.stdout


def test_serve_refuses_a_short_key(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path / "data", redis_url, api_port=free_port())
    env = {**os.environ, **settings.to_env(), "DEEPTARGET_API_KEY": "short-key"}
    done = subprocess.run([sys.executable, "-m", "deeptarget", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0 and "shorter than 16 bytes" in done.stderr
    assert "short-key" not in done.stderr + done.stdout  # the secret itself is never shown


async def test_with_redis_down_the_api_says_503_and_names_no_internal_address(tmp_path: Path) -> None:
    """Issue 12, L3: /healthz echoed the Redis exception (internal host and port); writes answered 500."""
    dead = free_port()  # nothing listens there
    settings = make_settings(tmp_path / "data", f"redis://127.0.0.1:{dead}/0", api_key=SecretStr("k" * 16))
    record = b'{"id": "p1", "media_url": "https://scontent.cdninstagram.com/p1.jpg"}'
    async with AppServer(create_app(settings)) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 503
            body = await response.text()
        async with http.post(f"{server.url}/ingest", data=record, headers={"X-API-Key": "k" * 16}) as response:
            assert response.status == 503, await response.text()
            assert str(dead) not in await response.text()
    assert str(dead) not in body and "127.0.0.1" not in body
