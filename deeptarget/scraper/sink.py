"""Where the scraper hands posts to the workers: Celery tasks on the ``infer`` and ``profiles`` queues."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from deeptarget.core.records import Post, PostRef
from deeptarget.jobs import Jobs


class PostSink(Protocol):
    def send_refs(self, refs: Sequence[PostRef]) -> None: ...

    def send_merges(self, posts: Sequence[Post]) -> None: ...


class CelerySink:
    """Publishes JSON task messages; ``send_refs`` returns once the broker has them (Redis: one LPUSH)."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def send_refs(self, refs: Sequence[PostRef]) -> None:
        self.jobs.infer(refs)

    def send_merges(self, posts: Sequence[Post]) -> None:
        self.jobs.merge_posts(posts)
