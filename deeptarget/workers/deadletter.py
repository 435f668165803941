"""The dead-letter stream: tasks that failed for good (retries used up, or a bug), kept with their arguments and error.

Nothing a task was given is lost when it fails: ``deeptarget deadletter list`` shows what failed and why, and
``deeptarget deadletter retry`` sends the same task with the same arguments again (tasks are idempotent). When Redis
itself is what failed, the letter goes to ``<data_dir>/deadletter.jsonl`` and the log instead.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from pydantic import BaseModel, Field

from deeptarget import constants

LOG = logging.getLogger(__name__)

ERROR_CHARS = 4000  # a traceback is kept, but not an unbounded one


class DeadLetter(BaseModel):
    id: str = ""  # the stream entry id (empty until stored)
    task: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    error: str
    traceback: str = ""
    retries: int = 0
    task_id: str = ""
    failed_at: float = Field(default_factory=time.time)

    @property
    def size(self) -> int:
        """Items the task carried (posts in a batch), for the listing."""
        first = self.args[0] if self.args else None
        return len(first) if isinstance(first, list) else 1


class DeadLetters:
    def __init__(self, client: redis.Redis, fallback_file: Path) -> None:
        self.client = client
        self.fallback_file = fallback_file

    def record(self, letter: DeadLetter) -> str | None:
        """Store a letter; returns its id, or None when Redis refused it and it went to the fallback file."""
        letter = letter.model_copy(
            update={"error": letter.error[:ERROR_CHARS], "traceback": letter.traceback[-ERROR_CHARS:]}
        )
        payload = letter.model_dump_json(exclude={"id"})
        try:
            entry_id = self.client.xadd(constants.deadletter_stream, {"letter": payload})
        except redis.RedisError as err:
            LOG.error("dead letter not stored in Redis (%s); appended to %s: %s", err, self.fallback_file, payload)
            self.fallback_file.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_file.open("a", encoding="utf-8") as handle:
                handle.write(payload + "\n")
            return None
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        LOG.error("task %s failed for good after %d retries: %s (dead letter %s)", letter.task, letter.retries,
                  letter.error.splitlines()[0] if letter.error else "", entry)  # fmt: skip
        return entry

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Oldest first."""
        entries = self.client.xrange(constants.deadletter_stream, count=limit)
        return [self._parse(entry_id, fields) for entry_id, fields in entries]

    def get(self, ids: list[str]) -> list[DeadLetter]:
        letters = []
        for entry_id in ids:
            found = self.client.xrange(constants.deadletter_stream, min=entry_id, max=entry_id)
            if not found:
                raise KeyError(f"no dead letter {entry_id}")
            letters.append(self._parse(*found[0]))
        return letters

    def retry(self, app: Celery, letters: list[DeadLetter]) -> int:
        """Send each letter's task again, then forget the letter (send first: at-least-once, tasks are idempotent)."""
        for letter in letters:
            queue = constants.task_queues.get(letter.task)
            app.send_task(letter.task, args=letter.args, kwargs=letter.kwargs, queue=queue)
            self.client.xdel(constants.deadletter_stream, letter.id)
            LOG.info("dead letter %s: %s sent again to the %s queue", letter.id, letter.task, queue)
        return len(letters)

    def drop(self, ids: list[str]) -> int:
        return int(self.client.xdel(constants.deadletter_stream, *ids)) if ids else 0

    @staticmethod
    def _parse(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        letter = DeadLetter.model_validate(json.loads(fields[b"letter"]))
        return letter.model_copy(update={"id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id})
