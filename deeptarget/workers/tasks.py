"""Celery tasks. Each is idempotent: running it twice for the same input leaves the same state (at-least-once delivery).

- ``infer`` (queue infer): a batch of PostRefs -> predictions and embeddings in the metadata store -> ``index`` and
  ``update_profiles`` work.
- ``index`` / ``remove_posts`` / ``snapshot`` (queue index, one consumer): embeddings into FAISS, deleted posts
  out; snapshots.
- ``train_hashtags`` (queue train): refit and publish the hashtag model.
- ``update_profiles`` / ``merge_posts`` (queue profiles): recompute users' profiles; learn owners of known posts.

A write the store refuses (a pushed post for an id a crawl or an earlier push stored: store/posts.py's rules) changes
nothing and goes no further (no index, no profile): it is logged with its reason and counted, in Prometheus and as
``refused:<reason>`` in the scraper's counters (``deeptarget:stats:scraper``), where the push was counted.

Transient failures (store, blob store, broker, GPU memory, a full disk: ``transient.py``) are retried with exponential
backoff and jitter; a task that still fails after ``task_max_retries``, or fails with anything else, is kept on the
dead-letter stream with its arguments (``deeptarget deadletter list|retry``). A retry that cannot be sent (Redis is
what failed) is never dropped: the message goes back to Redis, or stays there unacknowledged until the visibility
timeout brings it back. A finished task is marked done in Redis for twice the visibility timeout, so a copy delivered
again only because its acknowledgement was lost is skipped rather than run again.

``infer`` writes its results first and sends its follow-ups after; a send that fails (Redis away) fails nothing: the
index writer catches up from the store (``upkeep.py``), so a stored post is indexed whatever dies when (issue 13, 3).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter as Tally
from typing import Any, TypeVar

import redis
from celery import Celery, Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import InferResult, Post, PostRef
from deeptarget.jobs import DeeptargetCelery, Jobs
from deeptarget.models.hashtags import HashtagModel
from deeptarget.profiles.builder import rebuild_profiles
from deeptarget.store.metadata import REFUSALS, Recorded
from deeptarget.workers.app import settings_of
from deeptarget.workers.context import WorkerContext, context_for
from deeptarget.workers.deadletter import DeadLetter
from deeptarget.workers.metrics import forget_process
from deeptarget.workers.transient import BROKER_ERRORS, is_transient, retry_delay_s
from deeptarget.workers.upkeep import WriterUpkeep

LOG = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

POSTS = Counter("deeptarget_worker_posts_total", "Posts through the infer task, by outcome", ["outcome"])
REJECTIONS = Counter("deeptarget_worker_rejections_total", "Posts the infer task rejected, by reason", ["reason"])

RETRIES = Counter("deeptarget_worker_task_retries_total", "Task retries after transient failures", ["task"])
DEAD = Counter("deeptarget_worker_dead_letters_total", "Tasks that failed for good", ["task"])
REQUEUED = Counter(
    "deeptarget_worker_requeued_total", "Tasks given back to Redis because their retry could not be sent", ["task"]
)
SKIPPED = Counter("deeptarget_worker_redelivered_done_total", "Tasks delivered again after they finished", ["task"])
DEFERRED = Counter(
    "deeptarget_worker_followups_deferred_total", "infer follow-up sends that failed (the index writer catches up)"
)
WRITE_RETRIES = Counter("deeptarget_worker_store_write_retries_total", "infer store writes retried in place")


class PipelineTask(Task):
    """Retries transient failures with backoff from the settings; failures for good become dead letters."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._done_before():
            return None
        try:
            result = super().__call__(*args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            self._retry(err)
        self._mark_done()
        return result

    def _retry(self, err: Exception) -> None:
        """Raise the retry of this task (``Retry``), the error itself after the last one (its dead letter), or a
        requeue when the retry cannot be sent."""
        s = settings_of(self.app)
        retries = self.request.retries
        top = retry_delay_s(err, retries, s.task_retry_backoff_s, s.task_retry_disk_backoff_s,
                            s.task_retry_backoff_max_s, s.visibility_timeout_s)  # fmt: skip
        delay = random.uniform(0.5, 1.0) * top  # full jitter: spreads the retries of workers that failed together
        if retries < s.task_max_retries:
            RETRIES.labels(self.name).inc()
            LOG.warning("%s: %s: %s: retry %d of %d in %.1f s", self.name, type(err).__name__, err, retries + 1,
                        s.task_max_retries, delay)  # fmt: skip
        try:
            raise self.retry(exc=err, countdown=delay, max_retries=s.task_max_retries) from err
        except Reject as rejected:
            # Task.retry publishes the retry first and, when that fails, raises Reject(requeue=False): the message
            # would be acknowledged and lost (celery/app/task.py, Task.retry; issue 13, item 3). When the broker is
            # what failed, requeue instead: the worker's reject then puts the message back (Request.on_failure ->
            # reject(requeue=True)), or, Redis still away, cannot reach it and the message stays in Redis's unacked
            # set, which the broker delivers again after the visibility timeout ("late acknowledgment ... the task
            # will be redelivered to another worker", https://docs.celeryq.dev/en/stable/glossary.html; app.py).
            if not isinstance(rejected.reason, BROKER_ERRORS):
                raise err from rejected  # not the broker: fail for good, with a dead letter
            REQUEUED.labels(self.name).inc()
            LOG.warning("%s: the retry could not reach Redis (%s): given back for redelivery", self.name,
                        type(rejected.reason).__name__)  # fmt: skip
            raise Reject(rejected.reason, requeue=True) from err

    def _done_key(self) -> str | None:
        task_id = self.request.id
        return None if not task_id or self.request.called_directly else keys.task_done_key_prefix + task_id

    def _done_before(self) -> bool:
        """This very message finished before (Redis delivered it again: its acknowledgement was lost)."""
        key = self._done_key()
        if key is None:
            return False
        try:
            done = bool(_context(self).redis.exists(key))
        except redis.RedisError:  # cannot tell: run it (tasks are idempotent)
            return False
        if done:
            SKIPPED.labels(self.name).inc()
            LOG.info("%s[%s]: finished before and delivered again: skipped", self.name, self.request.id)
        return done

    def _mark_done(self) -> None:
        key = self._done_key()
        if key is None:
            return
        try:
            ttl = 2 * settings_of(self.app).visibility_timeout_s
            _context(self).redis.set(key, 1, ex=max(60, int(ttl)))
        except redis.RedisError:  # best effort: without it, a redelivered copy runs again, harmlessly
            pass

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
                pipe.hincrby(keys.scraper_stats_key, f"refused:{why}", n)
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


@shared_task(name=jobs.infer_task, **TASK)
def infer(self: Task, refs: list[dict[str, Any]]) -> dict[str, int]:
    ctx = _context(self)
    results = ctx.pipeline(_valid(PostRef, refs, "infer"))
    recorded = _record(ctx, results)
    _refused(ctx, recorded.refused, "infer")
    results = [r for r in results if r.post.id not in recorded.refused]
    embedded = [r.post.id for r in results if r.embedding is not None]
    rejected = len(results) - len(embedded)
    POSTS.labels("embedded").inc(len(embedded))
    POSTS.labels("rejected").inc(rejected)
    for result in results:
        if result.embedding is None:  # the reason's kind only: a bounded label set (the detail stays in the store)
            REJECTIONS.labels(str(result.prediction.reason or "unknown").split(":")[0][:40]).inc()
    _send_follow_ups(self.app, embedded, recorded.owners)
    LOG.info("infer: %d embedded, %d rejected", len(embedded), rejected)
    return {"embedded": len(embedded), "rejected": rejected, "refused": len(recorded.refused)}


def _record(ctx: WorkerContext, results: list[InferResult]) -> Recorded:
    """The batch's results into the store; a transient failure (the database away, a full disk) is retried here,
    with capped backoff for up to ``task_write_retry_s``, before the task retries: a task retry embeds the whole
    batch again (issue 13, item 7: 70 batches in 60 s of a full disk)."""

    def log(state: Any) -> None:
        WRITE_RETRIES.inc()
        err = state.outcome.exception() if state.outcome else None
        LOG.warning("infer: store write failed (%s: %s): retrying in place in %.1f s (the batch is not embedded "
                    "again)", type(err).__name__, err, state.upcoming_sleep)  # fmt: skip

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=10),
        stop=stop_after_delay(ctx.settings.task_write_retry_s),
        before_sleep=log,
        reraise=True,
    )
    return retrying(ctx.store.record_results, results)


def _send_follow_ups(app: Celery, embedded: list[str], owners: set[str]) -> None:
    """Profiles first, then the index: a post still ``embedded`` may lack both, and the writer's catch-up asks for
    both. A send that cannot reach Redis is logged and left to the catch-up: the store holds the work already."""
    try:
        send = Jobs(app)
        send.update_profiles(owners)
        send.index(embedded)
    except BROKER_ERRORS as err:
        DEFERRED.inc()
        LOG.warning("infer: follow-ups not sent (%s: %s): the index writer indexes these %d posts from the store "
                    "within index_catch_up_after_s", type(err).__name__, err, len(embedded))  # fmt: skip


@shared_task(name=jobs.index_task, **TASK)
def index(self: Task, post_ids: list[str]) -> int:
    ctx = _context(self)
    return ctx.writer.add(ctx.store.embeddings(post_ids))


@shared_task(name=jobs.remove_task, **TASK)
def remove_posts(self: Task, post_ids: list[str]) -> int:
    """Deleted posts out of the index (``deeptarget delete`` / ``DELETE /posts/{id}`` forgot them in the store)."""
    return _context(self).writer.remove(post_ids)


@shared_task(name=jobs.snapshot_task, **TASK)
def snapshot(self: Task, if_changed: bool = False) -> int | None:
    """Write a snapshot now (and give readers its version); with ``if_changed``, only when something changed since
    the last one and it is due (the beat's periodic flush: a safety net, the writer publishes changes on its own
    within ``snapshot_every_s``)."""
    writer = _context(self).writer
    return writer.maybe_snapshot() if if_changed else writer.snapshot()  # the flush defers a failed one by itself


@shared_task(name=jobs.rebuild_task, **TASK)
def rebuild_index(self: Task) -> int:
    """A fresh index from every embedding in the metadata store (after a backbone change, or to compact)."""
    return _context(self).writer.rebuild()


@shared_task(name=jobs.train_task, **TASK)
def train_hashtags(self: Task) -> int:
    ctx = _context(self)
    s = ctx.settings
    ids, tags = ctx.store.image_hashtags()
    model = HashtagModel.fit_with(s, ids, tags)
    version = model.save(s.hashtag_model_dir)
    ctx.redis.set(keys.hashtag_model_version_key, version)
    return version


@shared_task(name=jobs.profiles_task, **TASK)
def update_profiles(self: Task, user_ids: list[str]) -> int:
    ctx = _context(self)
    bounds = ctx.follower_bounds.get()
    for profile in rebuild_profiles(ctx.store, user_ids, ctx.settings.profile_half_life_days, bounds):
        ctx.redis.xadd(
            keys.profiles_stream,
            {"user_id": profile.user_id, "profile": profile.model_dump_json()},
            maxlen=keys.profiles_stream_maxlen,
            approximate=True,
        )
    return len(user_ids)


@shared_task(name=jobs.merge_task, **TASK)
def merge_posts(self: Task, posts: list[dict[str, Any]]) -> int:
    """Owner details learnt for posts that were first met without them (e.g. under a hashtag). The scraper sends a
    merge for a post it has seen before: a pushed one is a push of a known id, which never rewrites it. The store
    takes a merge only from the post's own source, and never to another owner (store/posts.py)."""
    ctx = _context(self)
    parsed = _valid(Post, posts, "merge_posts")
    refused = {p.id: "seen_before" for p in parsed if p.pushed}
    refused |= ctx.store.upsert_posts([p for p in parsed if not p.pushed])
    _refused(ctx, refused, "merge_posts")
    parsed = [p for p in parsed if p.id not in refused]
    owners = ctx.store.owners_of([p.id for p in parsed])
    Jobs(self.app).update_profiles(owners)
    return len(parsed)


@worker_process_init.connect
def _load_models(sender: Any = None, **_: Any) -> None:
    """Pool processes load the models before their first task, once; the index queue's consumer opens the writer
    (the replay of what the last one left) and starts its upkeep (heartbeat, catch-up) before any task comes."""
    from celery import current_app

    if not isinstance(current_app, DeeptargetCelery):
        return
    settings = current_app.settings
    if current_app.warm_infer:
        _models = context_for(settings).pipeline  # built now; not `_`, which holds the signal's kwargs
    if jobs.index_queue in current_app.amqp.queues.consume_from:
        _start_upkeep(current_app, context_for(settings))


def _start_upkeep(app: Celery, ctx: WorkerContext) -> None:
    ctx.upkeep = WriterUpkeep(ctx.settings, ctx.writer, ctx.store, ctx.redis, Jobs(app).update_profiles).start()


@worker_process_shutdown.connect
def _forget_metrics(pid: int | None = None, **_: Any) -> None:
    forget_process(pid or os.getpid())


@worker_process_shutdown.connect
@worker_shutdown.connect
def _final_snapshot(sender: Any = None, **_: Any) -> None:
    """A clean stop leaves a snapshot of everything indexed (a crash is covered by the replay on start); the writer's
    publisher thread stops first."""
    from celery import current_app

    if not isinstance(current_app, DeeptargetCelery):
        return
    ctx = context_for(current_app.settings)
    if ctx.upkeep is not None:
        ctx.upkeep.stop()
    if "writer" in ctx.__dict__:
        try:
            ctx.writer.close()
        except Exception:  # shutting down: report, never raise from a signal handler
            LOG.exception("final index snapshot failed; the next start replays from the metadata store")
