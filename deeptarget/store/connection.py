"""What every part of the metadata store shares: one database (databases.py) and the lock that lets threads share
it, with the three ways the store reads and writes through them (a write transaction, chunked ``IN (...)`` reads,
paged scans of the posts table)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from deeptarget.core.records import PostStatus
from deeptarget.store.databases import Database, Row

USABLE_STATUSES = (PostStatus.EMBEDDED, PostStatus.INDEXED)
"""Posts with an embedding that queries, the hashtag model and profiles count."""


def status_in(statuses: Sequence[PostStatus]) -> str:
    """``status IN ('a', 'b')``: for conditions composed into several queries, where bound parameters would have to
    follow each query's own order (the values are the enum's, never a caller's)."""
    return "status IN ({})".format(", ".join(f"'{PostStatus(status).value}'" for status in statuses))


USABLE = status_in(USABLE_STATUSES)


class StoreConnection:
    """The database and its lock (an ``RLock``: a write may read under it). Reads take the lock for one statement;
    writes for their transaction, which the database serializes across processes too."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction under the lock: committed when the block ends, rolled back when it raises."""
        with self.lock:
            self.db.begin()
            try:
                yield self.db
            except BaseException:
                self.db.end(commit=False)
                raise
            self.db.end(commit=True)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.lock:
            rows: list[Row] = self.db.execute(sql, params).fetchall()
        return rows

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self.lock:
            return self.db.execute(sql, params).fetchone()

    def fetch_in(self, sql: str, values: list[Any], chunk: int = 500) -> list[Row]:
        """``sql (?, ?, ...)`` over ``values``, ``chunk`` at a time (databases cap the parameters of a statement)."""
        out: list[Row] = []
        with self.lock:
            for start in range(0, len(values), chunk):
                part = values[start : start + chunk]
                marks = ",".join("?" * len(part))
                out.extend(self.db.execute(f"{sql} ({marks})", part).fetchall())
        return out

    def pages(self, columns: str, where: str, params: tuple[Any, ...], batch: int) -> Iterator[list[Row]]:
        """``SELECT columns FROM posts WHERE where`` in vector id order (unique and indexed in either database),
        ``batch`` rows at a time, each page its own short read (writers are never held up by a long scan)."""
        last = -(2**63)
        while True:
            rows = self.fetchall(
                f"SELECT vector_id AS page_key, {columns} FROM posts WHERE vector_id > ? AND {where} "
                "ORDER BY vector_id LIMIT ?",
                (last, *params, batch),
            )
            if not rows:
                return
            last = rows[-1]["page_key"]
            yield rows
