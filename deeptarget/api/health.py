"""What the API's health routes check (issue 13, item 5): liveness, readiness and the whole picture, kept apart.

- ``/livez``: the process answers (200 whenever it can answer at all). For restarts.
- ``/readyz``: reads can be served: the metadata store answers and the published index is loaded (or none was
  published yet: a new deployment answers its reads, empty). Redis is not asked: queries read the snapshot and the
  store, so a Redis blip must not take a serving API out of a load balancer or mark it unhealthy in compose.
- ``/healthz``: every dependency and stage by name (Redis, database, blob store, the served index and its age, the
  index writer's heartbeat, the store's backlog of posts not indexed yet, the Celery queues, the ingest stream's lag);
  200 when all are well, 503 with ``problems`` naming the rest. For people and monitoring.

Each check runs with its own deadline, concurrently; a failure is named by its kind, never its text (which names
hosts, ports and paths: issue 12, L3).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from deeptarget import jobs
from deeptarget.api.models import (
    BacklogBody,
    BlobsBody,
    CheckBody,
    HealthBody,
    IngestLagBody,
    ReadyBody,
    WriterBody,
)
from deeptarget.core import keys
from deeptarget.core.settings import Settings
from deeptarget.query.service import QueryService
from deeptarget.store.blobs import StorageUnavailable
from deeptarget.store.remote import attach

CHECK_TIMEOUT_S = 2.0
T = TypeVar("T")


def _kind(err: BaseException) -> str:
    return "timeout" if isinstance(err, TimeoutError) else type(err).__name__


async def _blocking(func: Callable[[], T]) -> T:
    """A blocking check on the executor, under the deadline."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, func), CHECK_TIMEOUT_S)


async def _guarded(check: Awaitable[T]) -> T | BaseException:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except Exception as err:  # any failure is the check's answer
        return err


async def _database(service: QueryService) -> tuple[CheckBody, BacklogBody]:
    """One query answers both: the store is reachable, and how far the index is behind it."""
    try:
        unindexed, oldest = await _blocking(service.store.index_backlog)
    except Exception as err:
        return CheckBody(ok=False, error=f"down: {_kind(err)}"), BacklogBody(ok=None, error="database down")
    age = None if oldest is None else max(0.0, time.time() - oldest)
    ok = age is None or age < service.settings.health_backlog_stale_s
    error = None if ok else f"a stored post has waited {age:.0f} s for the index"
    return CheckBody(ok=True), BacklogBody(ok=ok, error=error, unindexed=unindexed, oldest_s=age)


def _blobs(settings: Settings) -> BlobsBody:
    bucket = attach(settings)
    if bucket is not None:  # the images live there; the data dir is this process's cache
        try:
            bucket.probe()
        except StorageUnavailable as err:
            return BlobsBody(ok=False, error=f"bucket unreachable: {err.strerror}")
    root = settings.blob_dir if settings.blob_dir.exists() else settings.blob_dir.parent  # no image stored yet
    if not root.is_dir():
        return BlobsBody(ok=False, error="missing")
    if not os.access(root, os.W_OK | os.X_OK):
        return BlobsBody(ok=False, error="not writable")
    free = shutil.disk_usage(root).free
    low = free < settings.health_min_free_bytes
    return BlobsBody(ok=not low, error="low on space" if low else None, free_bytes=free)


def _index(service: QueryService) -> dict[str, object] | str:
    index = service.snapshots.get()
    if index is None:
        return "no snapshot yet"
    age = None if index.created is None else round(max(0.0, time.time() - index.created), 3)
    return {"vectors": index.ntotal, "model_id": index.model_id, "kind": index.kind, "nprobe": index.nprobe,
            "version": index.version, "age_s": age}  # fmt: skip


def _writer(raw: bytes | None, settings: Settings) -> WriterBody:
    if raw is None:
        return WriterBody(ok=False, error="no heartbeat: the index writer is not running")
    try:
        beat: dict[str, Any] = json.loads(raw)
        age = max(0.0, time.time() - float(beat["at"]))
    except (ValueError, KeyError, TypeError):
        return WriterBody(ok=False, error="unreadable heartbeat")
    stale = age > settings.health_writer_stale_s
    failing = int(beat.get("snapshot_failures") or 0)
    error = "stale heartbeat: the index writer stopped" if stale else "snapshots failing" if failing else None
    return WriterBody(ok=not stale and not failing, error=error, heartbeat_age_s=round(age, 3),
                      vectors=beat.get("vectors"), version=beat.get("version"), unpublished=beat.get("unpublished"),
                      snapshot_failures=failing)  # fmt: skip


async def _from_redis(client: aioredis.Redis) -> tuple[bytes | None, dict[str, int], IngestLagBody]:
    """The writer's heartbeat, queue lengths and the ingest stream's lag, in one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(keys.index_writer_key)
        for queue in jobs.all_queues:
            pipe.llen(queue)
        pipe.xlen(keys.ingest_stream)
        pipe.xrange(keys.ingest_stream, count=1)  # handled entries are deleted: the first is the oldest waiting
        beat, *lengths, waiting, first = await pipe.execute()
    oldest = None
    if first:
        entry_id = first[0][0].decode() if isinstance(first[0][0], bytes) else str(first[0][0])
        oldest = max(0.0, time.time() - int(entry_id.split("-")[0]) / 1000)
    queues = dict(zip(jobs.all_queues, (int(n) for n in lengths), strict=True))
    return beat, queues, IngestLagBody(waiting=int(waiting), oldest_s=oldest)


async def health(settings: Settings, service: QueryService, client: aioredis.Redis) -> HealthBody:
    redis_answer, (database, backlog), blobs = await asyncio.gather(
        _guarded(_from_redis(client)), _database(service), _guarded(_blocking(lambda: _blobs(settings)))
    )
    index = _index(service)
    if isinstance(redis_answer, BaseException):
        redis_state: bool | str = f"down: {_kind(redis_answer)}"
        writer, queues, ingest = WriterBody(ok=None, error="unknown: Redis is down"), None, None
    else:
        beat, queues, ingest = redis_answer
        redis_state, writer = True, _writer(beat, settings)
    if isinstance(blobs, BaseException):
        blobs = BlobsBody(ok=False, error=_kind(blobs))
    problems = [name for name, ok in (("redis", redis_state is True), ("database", database.ok), ("blobs", blobs.ok),
                                      ("index", not _unloadable(service)), ("writer", writer.ok),
                                      ("backlog", backlog.ok)) if ok is False]  # fmt: skip
    return HealthBody(status="degraded" if problems else "ok", problems=problems, redis=redis_state,
                      database=database, blobs=blobs, index=index, writer=writer, backlog=backlog, queues=queues,
                      ingest=ingest)  # fmt: skip


def _unloadable(service: QueryService) -> bool:
    """An index was published but this API holds none (its files cannot be read)."""
    return service.snapshots.get() is None and service.snapshots.store.versions.current() is not None


async def ready(service: QueryService) -> ReadyBody:
    database, _ = await _database(service)
    index = CheckBody(ok=False, error="published snapshot not loaded") if _unloadable(service) else CheckBody(ok=True)
    problems = [name for name, check in (("database", database), ("index", index)) if not check.ok]
    return ReadyBody(status="not ready" if problems else "ready", problems=problems, database=database, index=index)
