"""``deeptarget demo`` as a newcomer runs it: the whole flow, then the API stays up, and a post pushed to it then is
queryable within seconds (the scraper follows the ingest stream for as long as the API is up)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from deeptarget.runtime.embedded_redis import free_port
from deeptarget.sandbox import SandboxNetwork
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(600)


async def test_a_post_pushed_while_the_demo_api_is_up_is_queryable_within_seconds(
    tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "data", redis_url, sandbox_posts=40, api_port=free_port())
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deeptarget", "demo", env={**os.environ, **settings.to_env(), "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert demo.stdout is not None
    output: list[str] = []
    try:
        while not any("stays up" in line for line in output):
            line = await asyncio.wait_for(demo.stdout.readline(), timeout=400)
            assert line, "the demo ended early:\n" + "".join(output[-40:])
            output.append(line.decode(errors="replace"))
        text = "".join(output)
        sandbox_url = re.search(r"Sandbox at (http://127\.0\.0\.1:\d+)", text)
        assert sandbox_url, text
        network = SandboxNetwork(settings.sandbox_seed, settings.sandbox_posts, settings.sandbox_users,
                                 settings.sandbox_hashtags)  # fmt: skip
        picture = next(m for m in network.media if m.visible and m.kind == "IMAGE" and m.corruption is None)
        record = {"id": "pushed-after-the-demo", "media_url": f"{sandbox_url.group(1)}/media/{picture.id}.jpg",
                  "caption": "a late one #coffee"}  # fmt: skip
        key = (settings.data_dir / "api-key").read_text().strip()
        api = f"http://127.0.0.1:{settings.api_port}"
        async with aiohttp.ClientSession() as http:
            pushed_at = time.monotonic()
            async with http.post(f"{api}/ingest", data=json.dumps(record), headers={"X-API-Key": key}) as response:
                assert response.status == 202, await response.text()
                assert (await response.json())["accepted"] == 1
            while True:
                async with http.get(f"{api}/similar", params={"post_id": record["id"], "k": "3"}) as response:
                    if response.status == 200:
                        break
                assert time.monotonic() - pushed_at < 60, "the pushed post never became queryable"
                await asyncio.sleep(0.1)
            queryable_after = time.monotonic() - pushed_at
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
            await asyncio.wait_for(demo.wait(), timeout=60)
    assert demo.returncode == 0
    print(f"pushed post queryable after {queryable_after:.2f} s")  # shown with -s
