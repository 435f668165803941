"""Process plumbing shared by the CLI, the demo and the tests: which Redis to use, how to start worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import redis

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings
from deeptarget.runtime.embedded_redis import EmbeddedRedis

LOG = logging.getLogger(__name__)


def _url_file(settings: Settings) -> Path:
    return settings.redis_dir / "url"


def _alive(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _previous_port(settings: Settings) -> int | None:
    """The port the data dir's Redis had last time, if it is free: processes that outlive a restart of the embedded
    Redis (an API, a scraper) read its URL once, and reconnect by themselves only if it comes back where it was."""
    try:
        port = urlsplit(_url_file(settings).read_text().strip()).port
    except (OSError, ValueError):
        return None
    if port is None:
        return None
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds: TIME_WAIT is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def start_embedded_redis(settings: Settings) -> tuple[Settings, EmbeddedRedis]:
    """Start the project's own Redis in the data dir (on its previous port when free); returns settings pointing at
    it."""
    server = EmbeddedRedis(settings.redis_dir, port=_previous_port(settings)).start()
    url_file = _url_file(settings)
    descriptor = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the URL holds the password
    with os.fdopen(descriptor, "w") as handle:
        handle.write(server.url)
    os.chmod(url_file, 0o600)
    return settings.model_copy(update={"redis_url": server.url}), server


def connect_redis(settings: Settings) -> Settings:
    """Settings with a Redis URL: the configured one, or the embedded Redis already running for this data dir."""
    if settings.redis_url:
        return settings
    url_file = _url_file(settings)
    if url_file.is_file():
        url = url_file.read_text().strip()
        if _alive(url):
            return settings.model_copy(update={"redis_url": url})
    raise ConfigurationError(
        f"no Redis: set DEEPTARGET_REDIS_URL, or start the embedded one for {settings.data_dir} "
        "with 'deeptarget redis' (or run everything with 'deeptarget demo')"
    )


def spawn_worker(
    settings: Settings,
    queues: Sequence[str],
    *,
    name: str,
    pool: str = "prefork",
    concurrency: int = 1,
    log_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real Celery worker process (``deeptarget worker``) configured through DEEPTARGET_* variables."""
    env = {**os.environ, **settings.to_env(), **(extra_env or {})}
    command = [
        sys.executable, "-m", "deeptarget", "worker",
        "--queues", ",".join(queues), "--name", name, "--pool", pool, "--concurrency", str(concurrency),
    ]  # fmt: skip
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if not isinstance(output, int):  # the child has its own copy of the file now
            output.close()


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM to all (Celery's warm shutdown: finish the task in hand), then SIGKILL what is left after ``timeout_s``.

    All are signalled before any is waited for, so they shut down in parallel."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            LOG.warning("process %d did not stop in %.0f s: killed", process.pid, timeout_s)
            process.kill()
            process.wait()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (long-running commands: serve, sandbox, demo)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
