"""What every command shares: its Settings from the global options, logging, and the one place that builds a
metadata store, a Redis client and the task senders.

The heavy builders import what they build when called: the parser loads every command module, and
``deeptarget --help`` (or a command that needs none of them) should not pay for SQLAlchemy, numpy or redis.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeptarget import jobs
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import json_text
from deeptarget.jobs import Jobs

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

    from deeptarget.store.metadata import MetadataStore

LOG = logging.getLogger("deeptarget")


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--data-dir`` and ``-v``, which every command reads through ``load_settings``."""
    parser.add_argument("--config", help="TOML settings file (DEEPTARGET_* variables override it)")
    parser.add_argument("--data-dir", help="data directory (default: ./data)")
    parser.add_argument("-v", "--verbose", action="store_true")


def load_settings(args: argparse.Namespace) -> Settings:
    """The Settings of ``--config`` and ``--data-dir`` over the DEEPTARGET_* variables; the data dir made private."""
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    settings = Settings.load(Path(args.config) if args.config else None, **overrides)
    _private(settings.data_dir)
    from deeptarget.store.remote import attach  # light: boto3 loads only when a bucket is set

    attach(settings)
    return settings


def connect(settings: Settings) -> Settings:
    """``settings`` with a Redis URL: the configured one, or the embedded Redis running for the data dir."""
    from deeptarget.runtime.processes import connect_redis  # imports redis

    return connect_redis(settings)


def connected_settings(args: argparse.Namespace) -> Settings:
    """``connect(load_settings(args))``: for the commands that need Redis from the start."""
    return connect(load_settings(args))


def _private(data_dir: Path) -> None:
    """The data dir holds the metadata store, the images, the Redis AOF and secrets: 0700, whatever the umask
    (issue 12, L13: with umask 022 the store and the AOF were world-readable)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if data_dir.stat().st_uid == os.getuid():
            os.chmod(data_dir, 0o700)
    except OSError as err:  # a read-only or foreign dir: the command itself says what it cannot do
        LOG.debug("data dir %s left as it is: %s", data_dir, err)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports which CPU build it picked, at INFO


def metadata_store(settings: Settings, location: str | Path | None = None) -> MetadataStore:
    """The configured metadata store, or the one at ``location`` (store-copy's destination)."""
    from deeptarget.store.metadata import MetadataStore  # SQLAlchemy and numpy

    return MetadataStore(settings.metadata_database if location is None else location)


def redis_client(settings: Settings) -> redis.Redis:
    """A blocking client of ``settings.redis_url`` (from ``connected_settings``)."""
    import redis  # not for --help or the commands without Redis

    return redis.Redis.from_url(settings.redis_url or "")


def async_redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio client of ``settings.redis_url``; ``options`` go to ``from_url`` (timeouts)."""
    import redis.asyncio as aioredis  # not for --help or the commands without Redis

    return aioredis.Redis.from_url(settings.redis_url or "", **options)


def senders(settings: Settings) -> Jobs:
    """The typed task senders: every task the CLI sends goes through them."""
    return Jobs.for_settings(settings)


def send(settings: Settings, task: str) -> int:
    """Send ``task`` (no arguments) to its queue and say so."""
    senders(connect(settings)).send(task)
    print(f"sent {task} to the {jobs.task_queues[task]} queue")
    return 0


def print_json(value: Any) -> None:
    print(json_text(value))  # the same JSON, with every control character escaped: inert on a terminal
