"""The dead-letter stream: tasks that failed for good (retries used up, or a bug), kept with their arguments and error.

Nothing a task was given is lost when it fails: ``deeptarget deadletter list`` shows what failed and why, and
``deeptarget deadletter retry`` sends the same task with the same arguments again (tasks are idempotent). When Redis
itself is what failed, the letter goes to ``<data_dir>/deadletter.jsonl`` and the log instead.

Letters are named by their stream entry id (``<milliseconds>-<sequence>``, ``check_entry_id``); anything else is a
``ValueError`` before Redis is asked (issue 12, L10: ``retry abc`` ended in Redis's error and a traceback). A letter
that cannot be read is still listed and can be dropped; one whose task is not ours is never sent.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel, Field, ValidationError

from deeptarget.core import keys
from deeptarget.core.replies import at_once

if TYPE_CHECKING:  # only for the annotation: the CLI checks ids without loading Celery
    from deeptarget.jobs import Jobs

LOG = logging.getLogger(__name__)

ERROR_CHARS = 4000  # a traceback is kept, but not an unbounded one
UNREADABLE = "<unreadable>"  # the task of a letter whose stored form does not parse
_ENTRY_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_U64 = 2**64 - 1


def check_entry_id(entry_id: object) -> str:
    """``entry_id`` if it is a stream entry id (``1700000000000-0``: two numbers below 2^64); ``ValueError``
    otherwise."""
    match = _ENTRY_ID_RE.fullmatch(entry_id) if isinstance(entry_id, str) else None
    if match is None or int(match[1]) > _U64 or int(match[2]) > _U64:
        raise ValueError(f"{entry_id!r} is not a dead letter id: <milliseconds>-<sequence>, e.g. 1700000000000-0")
    return str(entry_id)


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
    # ``list`` is the CLI's word (``deeptarget deadletter list``); below it, the builtin is ``builtins.list``.

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
            entry_id = self.client.xadd(keys.deadletter_stream, {"letter": payload})
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

    def list(self, limit: int | None = None) -> builtins.list[DeadLetter]:
        """Oldest first."""
        entries = at_once(self.client.xrange(keys.deadletter_stream, count=limit))
        return [self._parse(entry_id, fields) for entry_id, fields in entries]

    def get(self, ids: builtins.list[str]) -> builtins.list[DeadLetter]:
        """The letters of ``ids``; ``ValueError`` for a malformed id, ``KeyError`` for one not there."""
        for entry_id in ids:
            check_entry_id(entry_id)
        letters = []
        for entry_id in ids:
            found = at_once(self.client.xrange(keys.deadletter_stream, min=entry_id, max=entry_id))
            if not found:
                raise KeyError(f"no dead letter {entry_id}")
            letters.append(self._parse(*found[0]))
        return letters

    def retry(self, jobs: Jobs, letters: builtins.list[DeadLetter]) -> int:
        """Send each letter's task again, then forget the letter (send first: at-least-once, tasks are idempotent).
        A letter whose task is not one of ours stays where it is (sent, it would wait on a queue nobody reads).
        Returns how many were sent."""
        from deeptarget.jobs import task_queues

        sent = 0
        for letter in letters:
            queue = task_queues.get(letter.task)
            if queue is None:
                LOG.warning("dead letter %s: task %r is not one of ours: not sent", letter.id, letter.task[:100])
                continue
            jobs.send(letter.task, letter.args, letter.kwargs)
            self.client.xdel(keys.deadletter_stream, letter.id)
            LOG.info("dead letter %s: %s sent again to the %s queue", letter.id, letter.task, queue)
            sent += 1
        return sent

    def drop(self, ids: builtins.list[str]) -> int:
        for entry_id in ids:
            check_entry_id(entry_id)
        return int(at_once(self.client.xdel(keys.deadletter_stream, *ids))) if ids else 0

    @staticmethod
    def _parse(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        """The stored letter; one that does not parse is listed as such (so it can be seen and dropped)."""
        name = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            letter = DeadLetter.model_validate(json.loads(fields[b"letter"]))
        except (KeyError, ValueError, RecursionError) as err:  # ValueError: JSON, UTF-8 and pydantic's
            reason = type(err).__name__ if not isinstance(err, ValidationError) else "not a dead letter's fields"
            return DeadLetter(id=name, task=UNREADABLE, error=f"unreadable letter: {reason}")
        return letter.model_copy(update={"id": name})
