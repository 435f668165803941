"""Push ingestion: partners hand over posts as JSON lines (``deeptarget enqueue FILE``, ``POST /ingest``).

Every record is validated on its own: a bad one is reported with its line number and reason and the good ones go on.
Valid posts wait on a Redis stream (``deeptarget:ingest``, durable with AOF); the scraper drains it through the same
path as crawled posts (dedup, download with limits, the infer queue), acknowledging each entry only once its post is
on the queue, so a scraper that dies mid-way leaves its entries pending for the next one to take over.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

import redis.asyncio as aioredis
from pydantic import ValidationError

from deeptarget import constants
from deeptarget.schema import Post, normalise_hashtag

GROUP = "scrapers"
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class BadRecord:
    line: int  # 1-based
    reason: str


def parse_posts(lines: Iterable[str | bytes], source: str = "push") -> tuple[list[Post], list[BadRecord]]:
    """Posts from JSON lines (blank lines skipped). A record needs ``id`` and an http(s) ``media_url``."""
    posts, bad = [], []
    for number, raw in enumerate(lines, 1):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        if len(text) > MAX_LINE_BYTES:
            bad.append(BadRecord(number, f"record longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            post = Post.model_validate({"source": source, **record})
        except json.JSONDecodeError as err:
            bad.append(BadRecord(number, f"not JSON: {err.msg} at column {err.colno}"))
            continue
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            bad.append(BadRecord(number, problems))
            continue
        except ValueError as err:
            bad.append(BadRecord(number, str(err)))
            continue
        if not post.media_url or urlparse(post.media_url).scheme not in ("http", "https"):
            bad.append(BadRecord(number, "media_url: an http(s) URL of the image is required"))
            continue
        posts.append(post.model_copy(update={"hashtags": [normalise_hashtag(t) for t in post.hashtags]}))
    return posts, bad


class IngestStream:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def push(self, posts: list[Post]) -> int:
        if not posts:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for post in posts:
                pipe.xadd(constants.ingest_stream, {"post": post.model_dump_json()})
            await pipe.execute()
        return len(posts)

    async def _group(self) -> None:
        try:
            await self.redis.xgroup_create(constants.ingest_stream, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def take(self, consumer: str, count: int, idle_ms: int) -> list[tuple[str, Post]]:
        """Entries for this consumer: first ones other consumers left pending for ``idle_ms`` (they died), then new."""
        await self._group()
        _, claimed, *_ = await self.redis.xautoclaim(
            constants.ingest_stream, GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=count
        )
        entries = list(claimed)
        if len(entries) < count:
            fresh = await self.redis.xreadgroup(
                GROUP, consumer, {constants.ingest_stream: ">"}, count=count - len(entries)
            )
            entries += [entry for _, stream_entries in fresh for entry in stream_entries]
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            out.append((key, Post.model_validate_json(fields[b"post"])))
        return out

    async def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            await self.redis.xack(constants.ingest_stream, GROUP, *entry_ids)
            await self.redis.xdel(constants.ingest_stream, *entry_ids)

    async def backlog(self) -> int:
        return int(await self.redis.xlen(constants.ingest_stream))
