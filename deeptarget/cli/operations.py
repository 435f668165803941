"""Operating on the data: ``store-copy``, ``enqueue``, ``delete`` and ``deadletter list|retry|drop``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from rich.console import Console
from rich.table import Table

from deeptarget.cli.arguments import checked, input_file, post_id, whole
from deeptarget.cli.context import (
    async_redis_client,
    connected_settings,
    load_settings,
    metadata_store,
    print_json,
    redis_client,
    senders,
)
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.settings import without_password
from deeptarget.core.terminal import plain, shown

if TYPE_CHECKING:
    from rich.progress import TaskID

SHOWN_REJECTIONS = 50  # a binary file is hundreds of bad lines: the first ones say enough


def _entry_id(text: str) -> str:
    from deeptarget.workers.deadletter import check_entry_id  # imports redis

    return checked(check_entry_id)(text)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store_copy = sub.add_parser(
        "store-copy", help="copy the metadata store to another (SQLite path or postgresql:// URL); stop writers first"
    )
    store_copy.add_argument(
        "--to", required=True, help="the destination; a password may come from PGPASSWORD or ~/.pgpass instead"
    )
    store_copy.set_defaults(run=cmd_store_copy)

    enqueue = sub.add_parser("enqueue", help="queue posts from a JSON-lines file (- for stdin) for the scraper")
    enqueue.add_argument("file")
    enqueue.set_defaults(run=cmd_enqueue)

    delete = sub.add_parser("delete", help="delete posts: forgotten by the store, removed from the index")
    delete.add_argument("post_ids", nargs="+", type=post_id)
    delete.set_defaults(run=cmd_delete)

    deadletter = sub.add_parser("deadletter", help="tasks that failed for good: list them, send them again, drop them")
    deadletter.add_argument("action", choices=["list", "retry", "drop"])
    deadletter.add_argument(
        "ids", nargs="*", type=_entry_id, help="entry ids from the list (retry, drop), e.g. 1700000000000-0"
    )
    deadletter.add_argument("--all", action="store_true", help="every dead letter (retry, drop)")
    deadletter.add_argument("--limit", type=whole(1, 1_000_000), help="show at most this many (list)")
    deadletter.add_argument("--json", action="store_true", help="full letters with arguments and traceback (list)")
    deadletter.set_defaults(run=cmd_deadletter)


def cmd_store_copy(args: argparse.Namespace) -> int:
    from rich.progress import Progress  # the largest part of rich (7 ms), for this command only

    from deeptarget.store.copy import copy_store  # SQLAlchemy and numpy, as the store

    settings = load_settings(args)
    source = metadata_store(settings)
    destination = metadata_store(settings, args.to)
    print(f"copying {settings.metadata_database_shown} -> {without_password(args.to)}")
    with Progress() as progress:
        tasks: dict[str, TaskID] = {}

        def advance(table: str, n: int) -> None:
            if table not in tasks:
                tasks[table] = progress.add_task(table, total=None)
            progress.advance(tasks[table], n)

        counts = copy_store(source, destination, advance)
    print(f"copied {counts.posts} posts, {counts.profiles} profiles, {counts.models} embedder records")
    if source.status_counts() != destination.status_counts():
        print("the copy's post counts differ from the source's: was something still writing?", file=sys.stderr)
        return 1
    return 0


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """The lines of ``handle``, none held longer than ``limit`` + 2 bytes: a longer one comes cut (and so is
    rejected as too long), the rest of it is skipped unread into memory."""
    while line := handle.readline(limit + 2):
        if len(line) == limit + 2 and not line.endswith(b"\n"):
            while (rest := handle.readline(64 * 1024)) and not rest.endswith(b"\n"):
                pass
        yield line


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.file != "-":
        input_file(args.file, "enqueue")

    from deeptarget.scraper.push import MAX_LINE_BYTES, IngestStream, parse_posts  # aiohttp, numpy, PIL

    settings = connected_settings(args)
    with open(args.file, "rb") if args.file != "-" else sys.stdin.buffer as handle:
        posts, bad = parse_posts(_bounded_lines(handle, MAX_LINE_BYTES))
    for record in bad[:SHOWN_REJECTIONS]:  # the reasons quote the file: shown inert
        print(f"{plain(args.file)}:{record.line}: rejected: {plain(record.reason)}", file=sys.stderr)
    if len(bad) > SHOWN_REJECTIONS:
        print(f"... and {len(bad) - SHOWN_REJECTIONS} more rejected lines", file=sys.stderr)

    async def push() -> int:
        client = async_redis_client(settings)
        try:
            return await IngestStream(client).push(posts)
        finally:
            await client.aclose()

    pushed = asyncio.run(push()) if posts else 0
    print(f"{pushed} posts queued for the scraper, {len(bad)} rejected")
    return 1 if bad and not pushed else 0


def cmd_delete(args: argparse.Namespace) -> int:
    from deeptarget.ops.deletion import delete_posts  # numpy, the store

    settings = connected_settings(args)
    deleted = delete_posts(metadata_store(settings), senders(settings), args.post_ids)
    unknown = sorted(set(args.post_ids) - set(deleted))
    print(f"deleted {len(deleted)} posts" + (f"; unknown: {plain(', '.join(unknown))}" if unknown else ""))
    return 0


def cmd_deadletter(args: argparse.Namespace) -> int:
    from deeptarget.workers.deadletter import DeadLetters  # imports redis

    settings = connected_settings(args)
    letters_store = DeadLetters(redis_client(settings), settings.deadletter_path)
    if args.action == "list":
        letters = letters_store.list(args.limit)
        if args.json:
            print_json([letter.model_dump() for letter in letters])
            return 0
        table = Table(title=f"{len(letters)} dead letters")
        for column in ("id", "failed at", "task", "items", "retries"):
            table.add_column(column, no_wrap=True)
        table.add_column("error", overflow="fold")
        for letter in letters:  # a task's error quotes its data (usernames, captions): shown inert
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.failed_at))
            table.add_row(shown(letter.id), when, shown(letter.task), str(letter.size), str(letter.retries),
                          shown(letter.error[:100]))  # fmt: skip
        Console(emoji=False).print(table)
        if letters_store.fallback_file.exists():
            print(f"letters written while Redis was down: {letters_store.fallback_file}")
        return 0
    if not args.ids and not args.all:
        raise DeepTargetError(f"deadletter {args.action}: name entry ids, or --all")
    try:
        letters = letters_store.list() if args.all else letters_store.get(args.ids)
    except KeyError as err:
        raise DeepTargetError(str(err.args[0])) from err
    if args.action == "drop":
        print(f"dropped {letters_store.drop([letter.id for letter in letters])} dead letters")
        return 0
    sent = letters_store.retry(senders(settings), letters)
    print(f"sent {sent} dead letters back to their queues")
    if sent < len(letters):
        print(f"{len(letters) - sent} left in place: their task is not one of ours (see deadletter list --json)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
