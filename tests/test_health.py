"""Liveness, readiness and health, kept apart (issue 13, item 5), on real parts: the API in this process over a real
Redis, a real store (SQLite, and PostgreSQL for a database that goes away), a real index writer and its upkeep loop.

- /livez answers whenever the process does;
- /readyz says whether reads can be served: Redis down leaves it ready, the database down does not;
- /healthz names each dependency and stage, and is 503 when one is down or behind (no writer heartbeat, a stored post
  waiting too long for the index, Redis down), with no host, port or password in its body.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psycopg
import pytest
import redis

from deeptarget import jobs
from deeptarget.api.app import create_app
from deeptarget.core import keys
from deeptarget.core.records import Post, Prediction
from deeptarget.core.settings import Settings
from deeptarget.index.writer import IndexWriter
from deeptarget.jobs import Jobs
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import free_port
from deeptarget.store.metadata import MetadataStore
from deeptarget.workers.upkeep import WriterUpkeep
from tests.conftest import make_settings
from tests.helpers import SECRET_ENV, compose
from tests.postgres import LocalPostgres

MODEL = "test:model"


def _record(store: MetadataStore, ids: list[str]) -> None:
    """Embedded posts in the store, as an infer task leaves them."""
    vectors = np.random.default_rng(len(ids)).normal(size=(len(ids), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.record_results(
        (Post(id=pid), None, Prediction(post_id=pid, status="embedded", model_id=MODEL), v)
        for pid, v in zip(ids, vectors, strict=True)
    )


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], str]:
    async with http.get(url) as response:
        text = await response.text()
        return response.status, await response.json(), text


async def _until(http: aiohttp.ClientSession, url: str, condition: Any, what: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = await _get(http, url)
        if condition(status, body):
            return body
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {status} {body}"
        await _sleep(0.1)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _upkeep(settings: Settings, store: MetadataStore, client: redis.Redis) -> tuple[IndexWriter, WriterUpkeep]:
    writer = IndexWriter.from_settings(settings, store)
    return writer, WriterUpkeep(settings, writer, store, client, Jobs.for_settings(settings).update_profiles)


async def test_every_stage_is_reported_and_a_missing_writer_or_a_waiting_post_is_degraded(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path / "data", redis_url, health_writer_stale_s=1.0, health_backlog_stale_s=0.5,
                             index_catch_up_after_s=0.0)  # fmt: skip
    store = MetadataStore(settings.metadata_database)
    async with AppServer(create_app(settings)) as server:
        url = server.url
        # a new deployment: nothing published yet, no writer yet
        assert (await _get(http, f"{url}/livez"))[:2] == (200, {"status": "alive"})
        status, ready, _ = await _get(http, f"{url}/readyz")
        assert status == 200 and ready["status"] == "ready"  # empty reads are reads
        status, body, _ = await _get(http, f"{url}/healthz")
        assert status == 503 and body["problems"] == ["writer"] and body["writer"]["ok"] is False
        assert body["redis"] is True and body["database"]["ok"] and body["blobs"]["ok"]
        assert body["queues"] == {q: 0 for q in jobs.all_queues} and body["ingest"]["waiting"] == 0

        # the writer indexes what is stored and beats: everything is well
        _record(store, ["a", "b", "c"])
        writer, upkeep = _upkeep(settings, store, redis_client)
        upkeep.tick()
        body = await _until(http, f"{url}/healthz", lambda s, b: s == 200, "a healthy picture")
        assert body["status"] == "ok" and body["problems"] == []
        assert body["index"]["vectors"] == 3 and body["index"]["age_s"] >= 0 and body["index"]["version"] >= 1
        assert body["writer"]["vectors"] == 3 and body["writer"]["heartbeat_age_s"] < 1.0
        assert body["backlog"] == {"ok": True, "error": None, "unindexed": 0, "oldest_s": None}

        # a post stored and not indexed for longer than the bound: the index is behind
        _record(store, ["d"])
        upkeep.heartbeat()
        body = await _until(http, f"{url}/healthz", lambda s, b: "backlog" in b["problems"], "a stale backlog")
        assert body["backlog"]["unindexed"] == 1 and body["backlog"]["oldest_s"] >= 0.5
        assert (await _get(http, f"{url}/readyz"))[0] == 200  # reads still work
        assert upkeep.tick() == 1  # the writer's catch-up takes it
        body = await _until(http, f"{url}/healthz", lambda s, b: s == 200 and b["index"]["vectors"] == 4,
                            "the backlog cleared and published")  # fmt: skip
        assert body["writer"]["vectors"] == 4 and body["backlog"]["unindexed"] == 0

        # the writer stops beating: dead after health_writer_stale_s
        body = await _until(http, f"{url}/healthz", lambda s, b: "writer" in b["problems"], "a stale heartbeat")
        assert body["writer"]["error"].startswith("stale heartbeat") and body["writer"]["heartbeat_age_s"] > 1.0
        writer.close()


async def test_redis_down_leaves_reads_ready_and_health_names_no_address(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    dead = free_port()
    settings = make_settings(tmp_path / "data", f"redis://:hunter2hunter2@127.0.0.1:{dead}/0")
    async with AppServer(create_app(settings)) as server:
        assert (await _get(http, f"{server.url}/livez"))[0] == 200
        status, ready, _ = await _get(http, f"{server.url}/readyz")
        assert status == 200 and ready["problems"] == []
        status, body, text = await _get(http, f"{server.url}/healthz")
    assert status == 503 and body["status"] == "degraded" and body["problems"] == ["redis"]
    assert body["redis"] == "down: ConnectionError" and body["writer"]["ok"] is None
    assert body["queues"] is None and body["ingest"] is None and body["database"]["ok"]
    assert str(dead) not in text and "127.0.0.1" not in text and "hunter2" not in text


async def test_the_database_gone_makes_reads_unready(
    tmp_path: Path, redis_url: str, postgres_server: LocalPostgres, http: aiohttp.ClientSession
) -> None:
    database = postgres_server.create_database()
    settings = make_settings(tmp_path / "data", redis_url, database_url=database)
    async with AppServer(create_app(settings)) as server:
        assert (await _get(http, f"{server.url}/readyz"))[0] == 200
        name = database.rsplit("/", 1)[1]
        with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")  # its connections are cut, and it is gone
        status, ready, text = await _get(http, f"{server.url}/readyz")
        assert status == 503 and ready["problems"] == ["database"]
        assert ready["database"]["error"] == "down: AdminShutdown"  # its connection was cut: psycopg's kind
        status, ready, text = await _get(http, f"{server.url}/readyz")  # reconnecting finds no database
        assert status == 503 and ready["database"]["error"] == "down: OperationalError"
        status, body, health_text = await _get(http, f"{server.url}/healthz")
        assert status == 503 and "database" in body["problems"] and (await _get(http, f"{server.url}/livez"))[0] == 200
    for shown in (text, health_text):
        assert str(postgres_server.port) not in shown and name not in shown


async def test_the_document_lists_the_three_routes(tmp_path: Path, redis_url: str, http: aiohttp.ClientSession) -> None:
    async with AppServer(create_app(make_settings(tmp_path / "data", redis_url))) as server:
        _, document, _ = await _get(http, f"{server.url}/openapi.json")
    paths = document["paths"]
    assert (
        sorted(paths["/healthz"]["get"]["responses"])
        == sorted(paths["/readyz"]["get"]["responses"])
        == [
            "200",
            "503",
        ]
    )
    assert sorted(paths["/livez"]["get"]["responses"]) == ["200"]


def test_compose_checks_readiness_and_gives_workers_a_stop_grace_under_the_visibility_timeout() -> None:
    services = compose(SECRET_ENV)["services"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    timeout = Settings().visibility_timeout_s
    for name in ("worker", "index-writer"):
        grace = services[name]["stop_grace_period"]
        assert grace.endswith("s") and 10 < int(grace[:-1]) <= timeout, (name, grace)


def test_a_second_index_writer_on_another_host_is_reported(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """With a bucket each host has its own data dir, so the directory's lock cannot see a writer elsewhere; the
    heartbeat in Redis can."""
    settings = make_settings(tmp_path / "data", redis_url, health_writer_stale_s=30.0)
    store = MetadataStore(settings.metadata_database)
    _, upkeep = _upkeep(settings, store, redis_client)
    upkeep.heartbeat()
    upkeep.heartbeat()
    assert "another index writer" not in caplog.text, "its own heartbeat is no rival"
    elsewhere = {"at": time.time(), "pid": 4242, "host": "gpu-host-2"}
    redis_client.set(keys.index_writer_key, json.dumps(elsewhere))
    upkeep.heartbeat()
    assert "another index writer is alive (pid 4242 on gpu-host-2)" in caplog.text
    redis_client.set(keys.index_writer_key, json.dumps({**elsewhere, "at": time.time() - 3600}))
    caplog.clear()
    _upkeep(settings, store, redis_client)[1].heartbeat()
    assert "another index writer" not in caplog.text, "a stale heartbeat is a dead writer's"
