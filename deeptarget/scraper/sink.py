"""Where the scraper hands posts to the workers: Celery tasks on the ``infer`` and ``profiles`` queues."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from celery import Celery

from deeptarget import constants
from deeptarget.schema import Post, PostRef


class PostSink(Protocol):
    def send_refs(self, refs: Sequence[PostRef]) -> None: ...

    def send_merges(self, posts: Sequence[Post]) -> None: ...


class CelerySink:
    """Publishes JSON task messages; ``send_refs`` returns once the broker has them (Redis: one LPUSH)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_refs(self, refs: Sequence[PostRef]) -> None:
        if refs:
            self.app.send_task(
                constants.infer_task, args=[[r.model_dump(mode="json") for r in refs]], queue=constants.infer_queue
            )

    def send_merges(self, posts: Sequence[Post]) -> None:
        if posts:
            self.app.send_task(
                constants.merge_task, args=[[p.model_dump(mode="json") for p in posts]], queue=constants.profiles_queue
            )
