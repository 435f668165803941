"""The index writer's changes as a Redis stream, which every reader applies to its own delta segment.

Each entry is one change the writer made, in the order it made them: ``add`` (int64 ids and their float32 vectors;
an id already indexed is replaced) or ``remove`` (ids). A snapshot records the id of the last entry it holds
(``stream_id`` in its metadata), so a reader that loads it applies exactly the entries after that id: the base plus
those entries is the writer's index, whatever host the reader is on. The stream is derived data; the journal in the
metadata store stays the source of truth (``index.writer``).

Redis semantics used (redis.io/commands): ``XADD`` returns the entry's id, ids only grow (``<ms>-<seq>``, never less
than the stream's last id); ``XRANGE`` with a ``(`` start is exclusive (Redis 6.2); ``XREAD BLOCK`` waits for entries
after an id; ``XTRIM MINID`` (6.2) drops entries older than an id. The embedded Redis is 6.2.

Each entry also carries the id of the entry before it (``prev``), so a reader notices a gap (Redis lost entries: a
restart without persistence, an entry the writer could not add during an outage). The gap heals when the next
snapshot, which holds every change, reaches the reader; the writer makes one soon after a failed append.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

LOG = logging.getLogger(__name__)

STREAM_KEY = "deeptarget:index:changes"
MAX_ENTRY_VECTORS = 4096  # larger changes are split: an entry stays a few MB whatever a batch holds


@dataclass(frozen=True)
class Change:
    """One of the writer's changes: ``add`` (ids and their vectors) or ``remove`` (ids)."""

    op: str
    ids: np.ndarray
    vectors: np.ndarray | None = None
    lists: np.ndarray | None = None  # the IVF list of each vector, by the coarse quantizer named ``trained_id``
    trained_id: str = ""

    def fields(self, prev: str) -> dict[str, bytes | str]:
        entry: dict[str, bytes | str] = {"op": self.op, "ids": self.ids.astype("<i8").tobytes(), "prev": prev}
        if self.vectors is not None:
            entry["dim"] = str(self.vectors.shape[1])
            entry["vectors"] = np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()
        if self.lists is not None:
            entry["lists"] = self.lists.astype("<i8").tobytes()
            entry["trained"] = self.trained_id
        return entry

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> Change:
        op = fields[b"op"].decode()
        ids = np.frombuffer(fields[b"ids"], dtype="<i8").astype(np.int64)
        if op == "remove":
            return cls(op, ids)
        if op != "add":
            raise ValueError(f"unknown index change {op!r}")
        dim = int(fields[b"dim"])
        vectors = np.frombuffer(fields[b"vectors"], dtype="<f4").reshape(len(ids), dim)
        lists = np.frombuffer(fields[b"lists"], dtype="<i8").astype(np.int64) if b"lists" in fields else None
        if lists is not None and len(lists) != len(ids):
            raise ValueError(f"{len(lists)} lists for {len(ids)} ids")
        return cls(op, ids, vectors, lists, fields.get(b"trained", b"").decode())


@dataclass(frozen=True)
class Entry:
    id: str
    prev: str
    change: Change


class DeltaStream:
    """The stream of index changes in Redis (``key``): the writer appends, readers read after an id."""

    def __init__(self, client: redis.Redis, key: str = STREAM_KEY) -> None:
        self.client = client
        self.key = key
        self._last: str = ""  # the writer's last appended id (its entries chain through ``prev``)

    @classmethod
    def from_url(cls, url: str, key: str = STREAM_KEY, socket_timeout_s: float = 5.0) -> DeltaStream:
        """``socket_timeout_s`` must exceed a reader's block time (redis-py's socket timeout covers XREAD BLOCK)."""
        return cls(redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=2), key)

    def append(self, change: Change) -> str:
        """Add the change (in entries of at most ``MAX_ENTRY_VECTORS`` ids); returns the last entry's id. Raises
        ``redis.RedisError`` when Redis cannot take it."""
        last = self._last
        for start in range(0, max(1, len(change.ids)), MAX_ENTRY_VECTORS):
            part = Change(
                change.op,
                change.ids[start : start + MAX_ENTRY_VECTORS],
                None if change.vectors is None else change.vectors[start : start + MAX_ENTRY_VECTORS],
                None if change.lists is None else change.lists[start : start + MAX_ENTRY_VECTORS],
                change.trained_id,
            )
            last = _text(self.client.xadd(self.key, part.fields(last)))  # type: ignore[arg-type]
            self._last = last
        return last

    def resume(self) -> str:
        """Chain the next append to the stream's newest entry, and return its id (a writer starting, or reaching
        Redis for the first time)."""
        self._last = self.last_id()
        return self._last

    def last_id(self) -> str:
        """The newest entry's id ("0-0" for an empty or missing stream)."""
        found: list[Any] = self.client.xrevrange(self.key, count=1)  # type: ignore[assignment]  # (sync client)
        return _text(found[0][0]) if found else "0-0"

    def read_after(self, after: str, count: int = 1000, block_ms: int | None = None) -> tuple[list[Entry], str]:
        """Entries after ``after`` (oldest first, at most ``count``), and the id to read after next time (past any
        malformed entry skipped); ``block_ms``: wait that long for the first."""
        raw: list[Any]
        if block_ms is None:
            raw = self.client.xrange(self.key, min=f"({after}", count=count)  # type: ignore[assignment]
        else:
            found: list[Any] = self.client.xread({self.key: after}, count=count, block=block_ms)  # type: ignore[assignment]
            raw = found[0][1] if found else []
        entries = []
        last = after
        for entry_id, fields in raw:
            last = _text(entry_id)
            try:
                entries.append(Entry(_text(entry_id), _text(fields.get(b"prev", b"")), Change.parse(fields)))
            except (KeyError, ValueError) as err:  # not the writer's: skipped, never applied half-read
                LOG.error("index change %s is malformed (%s); skipped", last, err)
        return entries, last

    def trim_before(self, min_id: str) -> None:
        """Drop entries older than ``min_id`` (no reader that can still use them is older)."""
        self.client.xtrim(self.key, minid=min_id, approximate=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def older(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes before ``b``."""
    return _parts(a) < _parts(b)


def _parts(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)
