"""Every message one stage sends another: the Celery task names, their queues, and a typed sender for each.

A stage that only sends (the scraper, the API, the CLI, the workers' follow-ups) builds ``Jobs.for_settings`` and
calls a method; only ``deeptarget worker`` builds the full app with the task bodies (``workers/app.py``). The names and
queues below are a wire format: a long-running deployment has messages in flight that carry them, so they never
change. Every message is JSON (Celery's JSON serializer; never pickle).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import Celery
from kombu.entity import Queue  # where it is defined: kombu's top level re-exports it lazily

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.records import Post, PostRef
from deeptarget.core.settings import Settings

__all__ = ["DeeptargetCelery", "Jobs", "all_queues", "sending_app", "task_queues"]

# Celery queues, which are Redis lists of the same names. The index queue must have exactly one consumer: FAISS
# indexes are not safe to write concurrently.
infer_queue = "infer"
index_queue = "index"
train_queue = "train"
profiles_queue = "profiles"
all_queues = (infer_queue, index_queue, train_queue, profiles_queue)

infer_task = "deeptarget.infer"
"""args: [list of PostRef as JSON]: fetch, decode, face-filter, embed, classify, store."""
index_task = "deeptarget.index"
"""args: [list of post ids] whose embeddings are stored: add them to the FAISS index."""
snapshot_task = "deeptarget.snapshot"
"""kwargs: {if_changed: bool}: publish an index snapshot now."""
rebuild_task = "deeptarget.rebuild_index"
"""no args: rebuild the index from every stored embedding (after a re-embed or a change of index kind)."""
remove_task = "deeptarget.remove_posts"
"""args: [list of post ids] deleted from the store: remove their vectors."""
train_task = "deeptarget.train_hashtags"
"""no args: refit the implicit ALS model of images x hashtags and publish it."""
profiles_task = "deeptarget.update_profiles"
"""args: [sorted list of owner ids]: recompute their interest profiles."""
merge_task = "deeptarget.merge_posts"
"""args: [list of Post as JSON]: a post seen before whose counts or owner changed (no new image to fetch)."""

task_queues: Mapping[str, str] = {
    infer_task: infer_queue,
    index_task: index_queue,
    snapshot_task: index_queue,
    rebuild_task: index_queue,
    remove_task: index_queue,
    train_task: train_queue,
    profiles_task: profiles_queue,
    merge_task: profiles_queue,
}
"""Where each task goes; the app routes by name (``task_routes``), so no sender names a queue."""


class DeeptargetCelery(Celery):  # type: ignore[misc]  # Celery has no types: the base is Any
    """A Celery app that carries the Settings it was built from (tasks read ``self.app.settings``)."""

    def __init__(self, settings: Settings, *, warm_infer: bool = False, **kwargs: Any) -> None:
        if not settings.redis_url:
            raise ConfigurationError("the Celery app needs settings.redis_url (resolve the embedded Redis first)")
        super().__init__("deeptarget", broker=settings.redis_url, **kwargs)
        self.settings = settings
        self.warm_infer = warm_infer  # pool processes load the models before their first task (an infer worker's)


def sending_app(settings: Settings, **kwargs: Any) -> DeeptargetCelery:
    """The app's broker, serialisation and routing: all a sender needs. ``workers.app.create_celery`` adds the
    worker's delivery settings and the task bodies on top."""
    app = DeeptargetCelery(settings, **kwargs)
    check_s = max(1, round(settings.redelivery_check_s))
    transport = {
        # Unacked tasks come back after this long (see workers/app.py's docstring and docker-compose.yml's stop grace).
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": check_s,  # look for them this often...
        "unacked_restore_throttle": 1,  # ...every time (kombu scans on every 10th look by default)
        # The sweep's lock: held by a consumer killed mid-sweep, it would stop every sweep for its expiry (300 s).
        "unacked_mutex_expire": max(30, 3 * check_s),
        # A Redis that is partitioned away rather than dead never closes the socket: without a timeout a publish
        # (the scraper's, infer's follow-ups) would wait on it for good instead of failing into a retry. Longer
        # than kombu's 1 s BRPOP, so an idle consumer is never cut off.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        task_queues=[Queue(name) for name in all_queues],  # type: ignore[no-untyped-call]  # unannotated in kombu
        task_default_queue=infer_queue,
        task_routes={name: {"queue": queue} for name, queue in task_queues.items()},
    )
    return app


class Jobs:
    """Typed senders, one per task. Each returns once the broker holds the message (Redis: one LPUSH) and raises
    kombu's/redis-py's connection errors when it cannot; callers decide whether to retry or leave it to a catch-up."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def for_settings(cls, settings: Settings) -> Jobs:
        return cls(sending_app(settings))

    def infer(self, refs: Sequence[PostRef] | Sequence[dict[str, Any]]) -> None:
        if refs:
            self.send(infer_task, [[r.model_dump(mode="json") if isinstance(r, PostRef) else r for r in refs]])

    def index(self, post_ids: Sequence[str]) -> None:
        if post_ids:
            self.send(index_task, [list(post_ids)])

    def snapshot(self, *, if_changed: bool = False) -> None:
        self.send(snapshot_task, kwargs={"if_changed": True} if if_changed else None)

    def rebuild_index(self) -> None:
        self.send(rebuild_task)

    def remove_posts(self, post_ids: Sequence[str]) -> None:
        if post_ids:
            self.send(remove_task, [list(post_ids)])

    def train_hashtags(self) -> None:
        self.send(train_task)

    def update_profiles(self, owners: Iterable[str]) -> None:
        ordered = sorted(set(owners))
        if ordered:
            self.send(profiles_task, [ordered])

    def merge_posts(self, posts: Sequence[Post]) -> None:
        if posts:
            self.send(merge_task, [[p.model_dump(mode="json") for p in posts]])

    def send(self, task: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        """Any known task by name (a dead letter's replay, ``deeptarget index --snapshot``); routed by name."""
        if task not in task_queues:
            raise ConfigurationError(f"not a deeptarget task: {task!r} (known: {', '.join(sorted(task_queues))})")
        self.app.send_task(task, args=list(args), kwargs=dict(kwargs or {}))
