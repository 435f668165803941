"""Celery tasks. Each is idempotent: running it twice for the same input leaves the same state (at-least-once delivery).

- ``infer`` (queue infer): a batch of PostRefs -> predictions and embeddings in the metadata store -> ``index`` and
  ``update_profiles`` work.
- ``index`` / ``remove_posts`` / ``snapshot`` (queue index, one consumer): embeddings into FAISS, deleted posts
  out; snapshots.
- ``train_hashtags`` (queue train): refit and publish the hashtag model.
- ``update_profiles`` / ``merge_posts`` (queue profiles): recompute users' profiles; learn owners of known posts.

A write the store refuses (a pushed post for an id a crawl or an earlier push stored: store.py's rules) changes
nothing and goes no further (no index, no profile): it is logged with its reason and counted, in Prometheus and as
``refused:<reason>`` in the scraper's counters (``deeptarget:stats:scraper``), where the push was counted.

Transient failures (store, blob store, broker, GPU memory) are retried with exponential backoff and jitter; a task that
still fails after ``task_max_retries``, or fails with anything else, is kept on the dead-letter stream with its
arguments (``deeptarget deadletter list|retry``).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter as Tally
from typing import Any, TypeVar

import redis
from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown
from kombu.exceptions import OperationalError
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError

from deeptarget import constants
from deeptarget.databases import TRANSIENT_DB_ERRORS
from deeptarget.errors import TransientError
from deeptarget.index.hashtags import HashtagModel
from deeptarget.profiles.builder import rebuild_profiles
from deeptarget.schema import Post, PostRef
from deeptarget.store import REFUSALS
from deeptarget.workers.app import settings_of
from deeptarget.workers.context import WorkerContext, context_for
from deeptarget.workers.deadletter import DeadLetter
from deeptarget.workers.metrics import forget_process

LOG = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

POSTS = Counter("deeptarget_worker_posts_total", "Posts through the infer task, by outcome", ["outcome"])

RETRIES = Counter("deeptarget_worker_task_retries_total", "Task retries after transient failures", ["task"])
DEAD = Counter("deeptarget_worker_dead_letters_total", "Tasks that failed for good", ["task"])

# Task-level failures worth retrying: the store, blob store or broker briefly unavailable, the GPU full.
TRANSIENT = (*TRANSIENT_DB_ERRORS, redis.ConnectionError, redis.TimeoutError, OperationalError, TransientError)


class PipelineTask(Task):
    """Retries transient failures with backoff from the settings; failures for good become dead letters."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except TRANSIENT as err:
            s = settings_of(self.app)
            retries = self.request.retries
            # full jitter: spreads the retries of many workers that failed together
            delay = random.uniform(0.5, 1.0) * min(s.task_retry_backoff_max_s, s.task_retry_backoff_s * 2**retries)
            if retries < s.task_max_retries:
                RETRIES.labels(self.name).inc()
                LOG.warning("%s: %s: retry %d of %d in %.1f s", self.name, err, retries + 1, s.task_max_retries, delay)
            raise self.retry(exc=err, countdown=delay, max_retries=s.task_max_retries) from err

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        DEAD.labels(self.name).inc()
        letter = DeadLetter(
            task=self.name,
            args=list(args or []),
            kwargs=dict(kwargs or {}),
            error=f"{type(exc).__name__}: {exc}",
            traceback=str(einfo or ""),
            retries=self.request.retries,
            task_id=task_id,
        )
        _context(self).dead_letters.record(letter)


TASK = {"bind": True, "base": PipelineTask}


def _context(task: Task) -> WorkerContext:
    return context_for(settings_of(task.app))


_LOGGED_REFUSALS = 20  # refused posts named in the log per task; the rest are counted


def _refused(ctx: WorkerContext, refused: dict[str, str], task: str) -> None:
    """Writes the store refused: each logged with its reason, counted by reason."""
    if not refused:
        return
    reasons = Tally(refused.values())
    for post_id, why in list(refused.items())[:_LOGGED_REFUSALS]:
        LOG.warning("%s: post %s not written: %s", task, post_id[:100], REFUSALS.get(why, why))
    if len(refused) > _LOGGED_REFUSALS:
        LOG.warning("%s: and %d more posts not written", task, len(refused) - _LOGGED_REFUSALS)
    for why, n in reasons.items():
        POSTS.labels(f"refused:{why}").inc(n)
    try:
        with ctx.redis.pipeline(transaction=False) as pipe:
            for why, n in reasons.items():
                pipe.hincrby(constants.scraper_stats_key, f"refused:{why}", n)
            pipe.execute()
    except redis.RedisError as err:  # a counter is not worth the task: the store's state is what matters
        LOG.warning("%s: refusals not counted in Redis: %s", task, type(err).__name__)


def _valid(model: type[M], records: list[dict[str, Any]], task: str) -> list[M]:
    """The records that parse; a bad one is counted and logged with its position, the rest go on."""
    valid = []
    for i, raw in enumerate(records):
        try:
            valid.append(model.model_validate(raw))
        except ValidationError as err:
            POSTS.labels("invalid_record").inc()
            LOG.error("%s: record %d of the batch is not a %s, dropped: %s", task, i, model.__name__, err)
    return valid


@shared_task(name=constants.infer_task, **TASK)
def infer(self: Task, refs: list[dict[str, Any]]) -> dict[str, int]:
    ctx = _context(self)
    results = ctx.pipeline(_valid(PostRef, refs, "infer"))
    recorded = ctx.store.record_results((r.post, r.blob, r.prediction, r.embedding) for r in results)
    _refused(ctx, recorded.refused, "infer")
    results = [r for r in results if r.post.id not in recorded.refused]
    owners = recorded.owners
    embedded = [r.post.id for r in results if r.embedding is not None]
    rejected = len(results) - len(embedded)
    POSTS.labels("embedded").inc(len(embedded))
    POSTS.labels("rejected").inc(rejected)
    if embedded:
        self.app.send_task(constants.index_task, args=[embedded], queue=constants.index_queue)
    if owners:
        self.app.send_task(constants.profiles_task, args=[sorted(owners)], queue=constants.profiles_queue)
    LOG.info("infer: %d embedded, %d rejected", len(embedded), rejected)
    return {"embedded": len(embedded), "rejected": rejected, "refused": len(recorded.refused)}


@shared_task(name=constants.index_task, **TASK)
def index(self: Task, post_ids: list[str]) -> int:
    ctx = _context(self)
    return ctx.writer.add(ctx.store.embeddings(post_ids))


@shared_task(name=constants.remove_task, **TASK)
def remove_posts(self: Task, post_ids: list[str]) -> int:
    """Deleted posts out of the index (``deeptarget delete`` / ``DELETE /posts/{id}`` forgot them in the store)."""
    return _context(self).writer.remove(post_ids)


@shared_task(name=constants.snapshot_task, **TASK)
def snapshot(self: Task, if_changed: bool = False) -> int | None:
    """Write a snapshot now (and give readers its version); with ``if_changed``, only when something changed since
    the last one and it is due (the beat's periodic flush: a safety net, the writer publishes changes on its own
    within ``snapshot_every_s``)."""
    writer = _context(self).writer
    return writer.maybe_snapshot() if if_changed else writer.snapshot()


@shared_task(name=constants.rebuild_task, **TASK)
def rebuild_index(self: Task) -> int:
    """A fresh index from every embedding in the metadata store (after a backbone change, or to compact)."""
    return _context(self).writer.rebuild()


@shared_task(name=constants.train_task, **TASK)
def train_hashtags(self: Task) -> int:
    ctx = _context(self)
    s = ctx.settings
    ids, tags = ctx.store.image_hashtags()
    model = HashtagModel.fit_with(s, ids, tags)
    version = model.save(s.hashtag_model_dir)
    ctx.redis.set(constants.hashtag_model_version_key, version)
    return version


@shared_task(name=constants.profiles_task, **TASK)
def update_profiles(self: Task, user_ids: list[str]) -> int:
    ctx = _context(self)
    bounds = ctx.follower_bounds.get()
    for profile in rebuild_profiles(ctx.store, user_ids, ctx.settings.profile_half_life_days, bounds):
        ctx.redis.xadd(
            constants.profiles_stream,
            {"user_id": profile.user_id, "profile": profile.model_dump_json()},
            maxlen=constants.profiles_stream_maxlen,
            approximate=True,
        )
    return len(user_ids)


@shared_task(name=constants.merge_task, **TASK)
def merge_posts(self: Task, posts: list[dict[str, Any]]) -> int:
    """Owner details learnt for posts that were first met without them (e.g. under a hashtag). The scraper sends a
    merge for a post it has seen before: a pushed one is a push of a known id, which never rewrites it."""
    ctx = _context(self)
    parsed = _valid(Post, posts, "merge_posts")
    refused = {p.id: "seen_before" for p in parsed if p.pushed}
    refused |= ctx.store.upsert_posts([p for p in parsed if not p.pushed])
    _refused(ctx, refused, "merge_posts")
    parsed = [p for p in parsed if p.id not in refused]
    owners = ctx.store.owners_of([p.id for p in parsed])
    if owners:
        self.app.send_task(constants.profiles_task, args=[sorted(owners)], queue=constants.profiles_queue)
    return len(parsed)


@worker_process_init.connect
def _load_models(sender: Any = None, **_: Any) -> None:
    """Prefork children load the models before their first task, once."""
    from celery import current_app

    settings = getattr(current_app, "deeptarget_settings", None)
    if settings is not None and getattr(current_app, "deeptarget_warm_infer", False):
        _ = context_for(settings).pipeline


@worker_process_shutdown.connect
def _forget_metrics(pid: int | None = None, **_: Any) -> None:
    forget_process(pid or os.getpid())


@worker_process_shutdown.connect
@worker_shutdown.connect
def _final_snapshot(sender: Any = None, **_: Any) -> None:
    """A clean stop leaves a snapshot of everything indexed (a crash is covered by the replay on start); the writer's
    publisher thread stops first."""
    from celery import current_app

    settings = getattr(current_app, "deeptarget_settings", None)
    if settings is None:
        return
    ctx = context_for(settings)
    if "writer" in ctx.__dict__:
        try:
            ctx.writer.close()
        except Exception:  # shutting down: report, never raise from a signal handler
            LOG.exception("final index snapshot failed; the next start replays from the metadata store")
