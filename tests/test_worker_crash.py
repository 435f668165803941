"""Killing a worker with SIGKILL in the middle of its work loses no post and indexes none twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from deeptarget import jobs
from deeptarget.jobs import Jobs
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.store.metadata import MetadataStore
from tests.conftest import WorkerFactory, make_settings, snapshot_size
from tests.helpers import crawl
from tests.queue_messages import queued_post_refs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_kill_9_mid_run_then_restart_processes_every_post_exactly_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory, metadata_database: str
) -> None:
    network = SandboxNetwork(seed=31, n_posts=80, n_users=8, n_hashtags=4, corrupt_share=0.0)
    # Unacked tasks of a dead worker come back after the visibility timeout: short here, an hour in production.
    settings = make_settings(
        tmp_path / "data",
        redis_url,
        batch_size=4,
        page_size=20,
        visibility_timeout_s=3,
        hashtags=network.hashtags,
        accounts=[a.username for a in network.accounts],
        database_url=metadata_database,  # SQLite, then PostgreSQL: a write cut short by the kill must roll back
    )

    async def crawl_sandbox() -> None:
        async with sandbox_server(network) as server:
            await crawl(settings.model_copy(update={"source_url": server.url}))

    asyncio.run(crawl_sandbox())  # every post waits on the infer queue before any worker runs
    # The visible images of the targets' media (album children included), as the sandbox documents them.
    expected = network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)
    queued = Counter(ref["post"]["id"] for ref in queued_post_refs(redis_client))
    assert set(queued) == expected and max(queued.values()) == 1 and len(expected) >= 40
    store = MetadataStore(settings.metadata_database)

    index_worker = start_worker(settings, [jobs.index_queue], "index", pool="solo")
    victim = start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "victim")
    deadline = time.monotonic() + 120
    while sum(store.status_counts().values()) < 8:
        assert time.monotonic() < deadline, "the worker processed nothing"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its pool child, mid-run, no chance to clean up
    victim.wait()
    done_at_kill = store.status_counts().get("indexed", 0)
    assert done_at_kill < len(expected), "the kill came too late to prove anything"

    start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "survivor")
    deadline = time.monotonic() + 180
    while store.status_counts().get("indexed", 0) < len(expected):
        assert time.monotonic() < deadline, f"posts lost: {store.status_counts()} of {len(expected)}"
        time.sleep(0.2)
    Jobs.for_settings(settings).snapshot()
    deadline = time.monotonic() + 60
    while snapshot_size(settings.index_dir) != len(expected):
        assert time.monotonic() < deadline and index_worker.poll() is None
        time.sleep(0.2)
    assert store.status_counts() == {"indexed": len(expected)}
