"""Read the Celery messages waiting in a Redis queue (kombu's Redis transport: one JSON envelope per list item)."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis


def queued_task_args(client: redis.Redis, queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message in ``queue``, oldest first. Fails on anything that is not JSON."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH puts the newest first
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json", envelope["content-type"]
        body = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], body[0]))
    return out


def queued_post_refs(client: redis.Redis) -> list[dict[str, Any]]:
    return [ref for name, args in queued_task_args(client, "infer") if name == "deeptarget.infer" for ref in args[0]]
