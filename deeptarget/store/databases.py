"""The metadata store's two databases: SQLite (one host; the default) and PostgreSQL (several hosts share it).

The store writes its SQL once, in SQLite's parameter style (``?`` and ``:name``); a database here runs it, and holds
the few pieces that differ between the two: column types, JSON functions, and the write transaction. Writes are
serialized in both (SQLite's write lock; a PostgreSQL advisory lock), so the store's read-modify-write steps need no
retry logic of their own.

A URL's password never shows in an error (issue 12, L4): libpq echoes the URL it cannot read, so a URL is checked
before it is used, and what the driver says about it is redacted (``config.redacted``), never chained.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

import psycopg

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import database_url_problem, redacted, without_password

# Errors after which the same call may work again (a locked SQLite file, a PostgreSQL server restarting).
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)

_WRITE_LOCK = 0x64656570  # the advisory lock every PostgreSQL write transaction takes ("deep")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")

Row = Any  # sqlite3.Row or _PostgresRow: both index by position and by column name


class Database(Protocol):
    @property
    def types(self) -> dict[str, str]: ...  # DDL placeholders: int, real, blob, without_rowid

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any] | dict[str, Any]]) -> None: ...
    def create_schema(self, ddl: str) -> None: ...
    def begin(self) -> None: ...
    def end(self, commit: bool) -> None: ...
    def close(self) -> None: ...
    def json_set(self, column: str) -> str: ...
    def json_key(self, key: str) -> str: ...
    def json_number(self, column: str, key: str) -> str: ...
    def json_flag(self, column: str, key: str) -> str: ...
    def json_elements(self, column: str, alias: str) -> str: ...


def open_database(location: str | Path) -> Database:
    """A ``postgresql://`` URL, or the path of a SQLite file. Raises ``ConfigurationError`` for a URL that cannot
    work (another scheme, which would be taken for a file's path, or a malformed one), shown without its password."""
    if isinstance(location, str) and (problem := database_url_problem(location)):
        raise ConfigurationError(f"metadata store {without_password(location)}: {problem}")
    if str(location).startswith(_POSTGRES_SCHEMES):
        return PostgresDatabase(str(location))
    return SqliteDatabase(Path(location))


class SqliteDatabase:
    types: ClassVar[dict[str, str]] = {
        "int": "INTEGER",
        "real": "REAL",
        "blob": "BLOB",
        "without_rowid": " WITHOUT ROWID",
    }

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=60000")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any] | dict[str, Any]]) -> None:
        self._db.executemany(sql, params)

    def create_schema(self, ddl: str) -> None:
        self._db.executescript(ddl)

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # the write lock up front: no deadlocking upgrade from a read lock

    def end(self, commit: bool) -> None:
        self._db.execute("COMMIT" if commit else "ROLLBACK")

    def close(self) -> None:
        self._db.close()

    def json_set(self, column: str) -> str:
        return f"json_set(COALESCE({column}, '{{}}'), ?, json(?))"

    def json_key(self, key: str) -> str:
        return '$."' + key.replace('"', "") + '"'

    def json_number(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def json_flag(self, column: str, key: str) -> str:
        return f"COALESCE(json_extract({column}, '$.{key}'), 0) != 0"

    def json_elements(self, column: str, alias: str) -> str:
        return f"json_each({column}) AS {alias}"


class PostgresDatabase:
    """One connection in autocommit mode (each read is its own short transaction), reopened after the server went
    away; write transactions are explicit and take one advisory lock, so writers queue as they do on SQLite."""

    types: ClassVar[dict[str, str]] = {
        "int": "BIGINT",
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
        "without_rowid": "",
    }

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._url, autocommit=True, row_factory=_postgres_rows)
        except psycopg.ProgrammingError as err:  # libpq could not read the URL: its message quotes it
            raise ConfigurationError(f"metadata store: {redacted(str(err).strip(), self._url)}") from None
        except psycopg.Error as err:  # the same kind (an OperationalError stays transient), the message redacted
            raise type(err)(redacted(str(err).strip(), self._url)) from None

    def __repr__(self) -> str:
        return f"PostgresDatabase({without_password(self._url)!r})"

    def _live(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        return self._live().execute(_postgres_sql(sql), params or None)

    def executemany(self, sql: str, params: Iterable[Sequence[Any] | dict[str, Any]]) -> None:
        with self._live().cursor() as cursor:
            cursor.executemany(_postgres_sql(sql), list(params))

    def create_schema(self, ddl: str) -> None:
        self.begin()  # the lock: processes starting together would race on CREATE ... IF NOT EXISTS
        try:
            self._conn.execute(ddl)
        except BaseException:
            self.end(commit=False)
            raise
        self.end(commit=True)

    def begin(self) -> None:
        self._live().execute(f"BEGIN; SELECT pg_advisory_xact_lock({_WRITE_LOCK})")  # one round trip

    def end(self, commit: bool) -> None:
        if commit:
            self._conn.execute("COMMIT")
        elif not self._conn.broken:  # a lost connection has rolled back already
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()

    def json_set(self, column: str) -> str:
        document = f"CAST(COALESCE({column}, '{{}}') AS jsonb)"
        return f"CAST(jsonb_set({document}, ARRAY[CAST(? AS text)], CAST(? AS jsonb)) AS text)"

    def json_key(self, key: str) -> str:
        return key

    def json_number(self, column: str, key: str) -> str:
        return f"CAST(CAST({column} AS jsonb)->>'{key}' AS double precision)"

    def json_flag(self, column: str, key: str) -> str:
        return f"COALESCE(CAST(CAST({column} AS jsonb)->>'{key}' AS boolean), false)"

    def json_elements(self, column: str, alias: str) -> str:
        return f"jsonb_array_elements_text(CAST({column} AS jsonb)) AS {alias}(value)"


@lru_cache(maxsize=512)
def _postgres_sql(sql: str) -> str:
    """SQLite's ``?`` and ``:name`` parameters in psycopg's style (``%s``, ``%(name)s``; a literal % doubled)."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", sql)


class _PostgresRow(tuple):
    """A row as sqlite3.Row gives it: by position, and by column name."""

    columns: ClassVar[dict[str, int]] = {}  # set on the subclass made for each query's columns

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self.columns[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.columns)


def _postgres_rows(cursor: psycopg.Cursor[Any]) -> Any:
    """psycopg's row factory, called for every statement: the row type of its columns."""
    return _row_type(tuple(column.name for column in cursor.description or ()))


@lru_cache(maxsize=256)
def _row_type(names: tuple[str, ...]) -> type[_PostgresRow]:
    """One row type per column list (the store runs a few dozen), not a new class per statement."""
    return type("Row", (_PostgresRow,), {"columns": {name: i for i, name in enumerate(names)}})
