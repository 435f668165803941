"""Whole rows of the tables a copy of the store moves row by row (``schema.COPIED_AS_ROWS``), read from one store
and upserted into another, perhaps on the other database (copy.py)."""

from __future__ import annotations

from collections.abc import Iterator

from deeptarget.store.connection import StoreConnection
from deeptarget.store.databases import Row
from deeptarget.store.schema import COPIED_AS_ROWS


class TableRows:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def rows_of(self, table: str, batch: int = 1000) -> Iterator[list[Row]]:
        """Every row of a table copied as rows, whole: posts in pages by vector id."""
        if table == "posts":
            yield from self._conn.pages("*", "1 = 1", (), batch)
            return
        assert table in COPIED_AS_ROWS, table
        rows = self._conn.fetchall(f"SELECT * FROM {table}")
        if rows:
            yield rows

    def put_rows(self, table: str, rows: list[Row]) -> None:
        """Upsert rows as ``rows_of`` gives them (another store's, perhaps on the other database)."""
        if not rows:
            return
        key = COPIED_AS_ROWS[table]
        columns = [c for c in rows[0].keys() if c != "page_key"]  # noqa: SIM118 (a row iterates its values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
        with self._conn.transaction() as db:
            db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT({key}) DO UPDATE SET {updates}",
                [tuple(row[c] for c in columns) for row in rows],
            )
