"""Faults injected from outside into real processes (issue 13, items 3, 4, 6 and 7): a real Redis killed with
SIGKILL and started again on the same port and directory (its AOF keeps the queues), real worker processes, the
index writer as the worker of the index queue, a real full file system. Every test ends with each stored post
indexed once (the snapshot holds exactly the posts, the store calls each indexed), no dead letter and nothing done by
hand; recovery times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import Owner, Post, PostRef, Prediction, vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.vectors import SnapshotStore
from deeptarget.jobs import Jobs
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from tests.conftest import WorkerFactory, make_settings, snapshot_size, wait_for
from tests.faults import CannotMount, fill, kill_9, small_tmpfs
from tests.helpers import FAST_RECOVERY, assert_no_dead_letters, crawl, queues_quiet
from tests.queue_messages import queued_task_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _record(store: MetadataStore, ids: list[str], dim: int, seed: int, owner: str | None = None) -> None:
    """Embedded posts in the store, as an infer task leaves them after its write."""
    vectors = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    who = Owner(id=owner, username=owner) if owner else None
    store.record_results(
        (Post(id=pid, owner=who), None, Prediction(post_id=pid, status="embedded", model_id="test:model"), v)
        for pid, v in zip(ids, vectors, strict=True)
    )


def _all_indexed_once(store: MetadataStore, settings: Settings, expected: int) -> bool:
    return store.status_counts() == {"indexed": expected} and snapshot_size(settings.index_dir) == expected


def test_redis_killed_mid_run_and_back_after_5_s_every_stored_post_is_indexed_once(
    tmp_path: Path, own_redis: EmbeddedRedis, start_worker: WorkerFactory
) -> None:
    """Issue 13, item 3: 8 to 15 posts per outage were stored but never indexed, and tasks whose retry could not
    reach Redis were dropped. Now the follow-ups of a task that lost Redis are the index writer's catch-up, and
    a retry that cannot be sent goes back to Redis."""
    network = SandboxNetwork(seed=41, n_posts=80, n_users=8, n_hashtags=4, corrupt_share=0.0)
    settings = make_settings(tmp_path / "data", own_redis.url, batch_size=4, page_size=20, hashtags=network.hashtags,
                             accounts=[a.username for a in network.accounts], **FAST_RECOVERY)  # fmt: skip

    async def crawl_sandbox() -> None:
        async with sandbox_server(network) as server:
            await crawl(settings.model_copy(update={"source_url": server.url}))

    asyncio.run(crawl_sandbox())  # every post waits on the infer queue
    expected = network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)
    assert len(expected) >= 40
    store = MetadataStore(settings.metadata_database)
    workers = [
        start_worker(settings, [jobs.index_queue], "index", pool="solo"),
        start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "infer"),
    ]
    wait_for(lambda: sum(store.status_counts().values()) >= 8, "the first stored posts", timeout_s=120)
    own_redis.stop(kill=True)
    stored_at_kill = sum(store.status_counts().values())
    assert stored_at_kill < len(expected), "the kill came too late to prove anything"
    time.sleep(5)  # the outage itself
    own_redis.start()
    back = time.monotonic()
    client = redis.Redis.from_url(own_redis.url)
    deadline = back + 180
    while not (_all_indexed_once(store, settings, len(expected)) and queues_quiet(client)):
        assert all(w.poll() is None for w in workers), "a worker died"
        assert time.monotonic() < deadline, f"not recovered: {store.status_counts()} of {len(expected)}"
        time.sleep(0.2)
    took = time.monotonic() - back
    print(f"\nRedis kill -9, back after 5 s: {stored_at_kill} of {len(expected)} posts stored at the kill; all "
          f"{len(expected)} indexed once and the queues empty {took:.1f} s after Redis was back")  # fmt: skip
    assert_no_dead_letters(client, settings)


def test_index_writer_killed_mid_snapshot_leaves_no_temp_file_and_loses_nothing(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    """Issue 13, items 4 and 6: each kill left a temporary file as large as the index, and its task waited an hour."""
    settings = make_settings(tmp_path / "data", redis_url, snapshot_every_s=0.0, **FAST_RECOVERY)
    store = MetadataStore(settings.metadata_database)
    dim, total = 1024, 12_000  # 49 MB snapshots: long enough to be caught in the middle of one
    _record(store, [f"base{i}" for i in range(total)], dim, seed=0)
    worker = start_worker(settings, [jobs.index_queue], "index-0", pool="solo")  # replays and publishes
    wait_for(lambda: snapshot_size(settings.index_dir) == total, "the first snapshot")
    send = Jobs.for_settings(settings)
    kills: list[float] = []
    for round_ in range(30):
        if len(kills) == 3:
            break
        ids = [f"r{round_}-{i}" for i in range(100)]
        _record(store, ids, dim, seed=round_ + 1)
        total += len(ids)
        send.index(ids)
        temp = _temp_file_or_none(settings, total)
        if temp is None:
            continue  # that snapshot was over before it was seen: the next round tries again
        os.killpg(worker.pid, signal.SIGSTOP)  # frozen, so that what is seen next is what the kill leaves
        if not temp.exists():  # the rename came between the glob and the freeze
            os.killpg(worker.pid, signal.SIGCONT)
            wait_for(lambda: snapshot_size(settings.index_dir) == total, "the round's posts published")  # noqa: B023
            continue
        kill_9(worker)
        assert temp.exists(), "killed mid-snapshot, its temporary file stays"  # empty when caught at its creation
        restarted = time.monotonic()
        worker = start_worker(settings, [jobs.index_queue], f"index-{len(kills) + 1}", pool="solo")
        assert not temp.exists(), "the new writer sweeps what the dead one left"
        wait_for(lambda: snapshot_size(settings.index_dir) == total, "the round's posts published")  # noqa: B023
        kills.append(time.monotonic() - restarted)
    assert len(kills) == 3, f"caught only {len(kills)} snapshots in the middle"
    wait_for(
        lambda: _all_indexed_once(store, settings, total) and queues_quiet(redis_client), "every post indexed once"
    )
    assert not list(settings.index_dir.glob(".*.tmp-*"))
    print(f"\nindex writer kill -9 mid-snapshot x3 ({total} vectors of {dim}-d): everything published again "
          f"{', '.join(f'{k:.1f}' for k in kills)} s after each restart")  # fmt: skip
    assert_no_dead_letters(redis_client, settings)


def _temp_file_or_none(settings: Settings, total: int) -> Path | None:
    """The snapshot's temporary file while it is being written; None once the snapshot is published."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list(settings.index_dir.glob(".v*.faiss.tmp-*"))
        if found:
            return found[0]
        if snapshot_size(settings.index_dir) == total:
            return None
        time.sleep(0.001)
    raise AssertionError("no snapshot came")


def test_a_killed_workers_task_runs_again_within_the_visibility_timeout(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    """Issue 13, item 4: redelivery took the visibility timeout (an hour) plus kombu's sweep (100 s by default)."""
    # A timeout longer than a worker's start, so that the timeout is what the test sees.
    settings = make_settings(tmp_path / "data", redis_url, face_policy="off", **{**FAST_RECOVERY,
                             "visibility_timeout_s": 10})  # fmt: skip
    store = MetadataStore(settings.metadata_database)
    blobs = BlobStore(settings.blob_dir)
    media = SandboxNetwork(seed=9, n_posts=4, corrupt_share=0.0).media[:4]
    refs = [PostRef(post=Post(id=m.id), blob=blobs.put(m.image_bytes())) for m in media]
    victim = start_worker(settings, [jobs.infer_queue], "victim")
    # The store's write lock, held here: the task embeds, then waits for its write, mid-task for as long as needed.
    lock = sqlite3.connect(settings.metadata_database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    Jobs.for_settings(settings).infer(refs)
    wait_for(lambda: redis_client.hlen("unacked") == 1, "the task in the worker's hands")
    kill_9(victim)
    killed = time.monotonic()
    lock.execute("ROLLBACK")
    lock.close()
    assert not store.status_counts()
    start_worker(settings, [jobs.infer_queue], "heir")
    ready = time.monotonic()
    wait_for(lambda: store.status_counts().get("embedded") == len(refs), "the task run again", timeout_s=120)
    took = time.monotonic() - killed
    print(
        f"\nworker kill -9 mid-task: its task ran again {took:.1f} s after the kill (the next worker was ready "
        f"after {ready - killed:.1f} s; visibility timeout {settings.visibility_timeout_s} s, checked every "
        f"{settings.redelivery_check_s:.0f} s)"
    )
    # back once the timeout is over and a worker is there, within one check and the task itself (kombu's own check
    # comes every 100 s, and the timeout was an hour)
    assert took < max(ready - killed, settings.visibility_timeout_s) + settings.redelivery_check_s + 30
    assert_no_dead_letters(redis_client, settings)


def test_posts_stored_without_their_follow_ups_are_indexed_and_profiled_while_the_writer_runs(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    """Issue 13, item 3: the only catch-up was at the writer's start. Posts stored the way a dying infer task leaves
    them (written, no index or profiles task sent) and a post deleted with no remove task reach the index within
    index_catch_up_after_s + index_catch_up_every_s, the running writer's own doing."""
    settings = make_settings(tmp_path / "data", redis_url, **FAST_RECOVERY)
    store = MetadataStore(settings.metadata_database)
    _record(store, ["early"], 16, seed=0)
    start_worker(settings, [jobs.index_queue], "index", pool="solo")
    wait_for(lambda: snapshot_size(settings.index_dir) == 1, "the start's replay")
    ids = [f"late{i}" for i in range(5)]
    _record(store, ids, 16, seed=1, owner="u1")
    started = time.monotonic()
    wait_for(lambda: snapshot_size(settings.index_dir) == 6, "the catch-up", timeout_s=30)
    caught = time.monotonic() - started
    assert store.status_counts() == {"indexed": 6}
    profiles = [args for task, args in queued_task_args(redis_client, jobs.profiles_queue)]
    assert [["u1"]] in profiles or ["u1"] in profiles, profiles  # the owners' profiles asked for, as infer would
    deleted, _ = store.delete_posts(["late0"])
    wait_for(lambda: snapshot_size(settings.index_dir) == 5, "the deletion caught up", timeout_s=30)
    index = SnapshotStore(settings.index_dir).load()
    assert index is not None and vector_id("late0") not in index and deleted == ["late0"]
    assert redis_client.exists(keys.index_writer_key), "the writer's heartbeat"
    print(f"\nstored without follow-ups: indexed by the running writer {caught:.1f} s later")
    assert_no_dead_letters(redis_client, settings)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MB tmpfs, so that the test can fill it for real (root only)."""
    try:
        with small_tmpfs(tmp_path / "disk", "48m") as mount_point:
            yield mount_point
    except CannotMount as why:
        pytest.skip(str(why))


def test_a_full_disk_is_waited_out_without_dead_letters_or_embedding_twice(
    tmp_path: Path, small_disk: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    """Issue 13, item 7: with the data volume full, each retry embedded the batch again and ended as a dead letter.
    Now the infer task retries its store write in place, and the writer defers the snapshots it cannot write."""
    settings = make_settings(small_disk / "data", redis_url, face_policy="off", **FAST_RECOVERY)
    store = MetadataStore(settings.metadata_database)
    blobs = BlobStore(settings.blob_dir)
    media = SandboxNetwork(seed=5, n_posts=6, corrupt_share=0.0).media[:6]
    refs = [PostRef(post=Post(id=m.id), blob=blobs.put(m.image_bytes())) for m in media]
    log = tmp_path / "worker-infer.log"
    start_worker(settings, [jobs.index_queue], "index", pool="solo")
    start_worker(settings, [jobs.infer_queue], "infer")
    filler = fill(small_disk)
    Jobs.for_settings(settings).infer(refs)
    wait_for(lambda: "retrying in place" in log.read_text(), "the write to fail on the full disk")
    full_for = 3.0
    time.sleep(full_for)  # the disk stays full a while
    filler.unlink()
    freed = time.monotonic()
    wait_for(lambda: _all_indexed_once(store, settings, len(refs)) and queues_quiet(redis_client), "every post indexed")
    text = log.read_text()
    assert text.count(f"infer: {len(refs)} embedded") == 1, "embedded once, not once per retry"
    assert "retry 1 of" not in text
    print(
        f"\ndata volume full: infer waited in place, every post indexed {time.monotonic() - freed:.1f} s after "
        "space came back"
    )
    assert_no_dead_letters(redis_client, settings)
