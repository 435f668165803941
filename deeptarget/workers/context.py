"""What a worker process holds between tasks: stores, and models loaded once (per process, after the fork)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from functools import cached_property
from typing import TYPE_CHECKING

import redis
import torch

from deeptarget.core.settings import Settings
from deeptarget.index.deltas import DeltaStream
from deeptarget.index.writer import IndexWriter
from deeptarget.profiles.outliers import FollowerBoundsCache
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from deeptarget.store.remote import attach
from deeptarget.workers.deadletter import DeadLetters
from deeptarget.workers.pipeline import InferencePipeline

if TYPE_CHECKING:
    from deeptarget.workers.upkeep import WriterUpkeep

LOG = logging.getLogger(__name__)


class WorkerContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        attach(settings)  # images, snapshots, models and heads in the bucket, when there is one
        self.pid = os.getpid()
        self.upkeep: WriterUpkeep | None = None  # the index writer's loop, in the index queue's consumer

    @cached_property
    def store(self) -> MetadataStore:
        return MetadataStore(self.settings.metadata_database)

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore.for_settings(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        assert self.settings.redis_url
        # Timeouts: a Redis that vanished without closing the connection must fail a call, not hang the task.
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5)

    @cached_property
    def follower_bounds(self) -> FollowerBoundsCache:
        return FollowerBoundsCache(self.store, self.settings.follower_outlier_k)

    @cached_property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.redis, self.settings.deadletter_path)

    @cached_property
    def pipeline(self) -> InferencePipeline:
        # Pool processes share the cores: each gets its slice, or they oversubscribe and all slow down.
        threads = self.settings.torch_threads or max(1, (os.cpu_count() or 1) // self.settings.worker_concurrency)
        torch.set_num_threads(threads)
        pipeline = InferencePipeline(self.settings, self.blobs)
        self.store.register_model(pipeline.model_id, asdict(pipeline.embedder.spec))  # the API may need it
        LOG.info(
            "models loaded in pid %d: %s on %s, %d threads",
            self.pid,
            pipeline.model_id,
            pipeline.embedder.device,
            threads,
        )
        return pipeline

    @cached_property
    def writer(self) -> IndexWriter:
        # Its own connection, with short timeouts: an add waits at most that long for a Redis that vanished, then
        # readers get the change through snapshots until the stream is back (see IndexWriter).
        assert self.settings.redis_url
        deltas = DeltaStream.from_url(self.settings.redis_url, socket_timeout_s=2)
        return IndexWriter.from_settings(self.settings, self.store, deltas)


_contexts: dict[tuple[int, int], WorkerContext] = {}


def context_for(settings: Settings) -> WorkerContext:
    """One context per (process, settings object): a forked child never reuses its parent's connections."""
    key = (os.getpid(), id(settings))
    if key not in _contexts:
        _contexts[key] = WorkerContext(settings)
    return _contexts[key]
