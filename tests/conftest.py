"""Fixtures on real parts: a real redis-server (the embedded one), real Celery worker processes, the sandbox served
over HTTP on loopback. No fakes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from deeptarget.core.settings import Settings
from deeptarget.index.vectors import SnapshotStore
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.runtime.processes import spawn_worker, stop_processes
from deeptarget.workers.app import create_celery
from tests.objectstore import Relay, S3Server, TestBucket, set_credentials
from tests.postgres import LocalPostgres

# Settings come from the test, never from the machine's environment.
for _name in [n for n in os.environ if n.startswith("DEEPTARGET_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-protocol server process (moto_server) on loopback, shared by the session; each test its own bucket."""
    set_credentials()
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[TestBucket]:
    """A fresh bucket, reached through a relay the test can stop (``with bucket.away():``)."""
    relay = Relay(s3_server.port).start()
    yield TestBucket(s3_server, relay, s3_server.create_bucket())
    relay.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def metadata_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives, on each database it supports: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "metadata.sqlite3")
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def make_settings(data_dir: Path, redis_url: str | None = None, **overrides: object) -> Settings:
    """Small, fast settings for tests: random weights (no files needed), small images and snapshots often."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "redis_url": redis_url,
        "weights": "none",
        "image_size": 96,
        "decode_long_side": 320,
        "snapshot_every_s": 0.5,
        "index_seal_every_s": 0.5,  # tests that read snapshot files see changes soon; readers follow the stream
        "torch_threads": 1,
        "sandbox_posts": 60,
        "sandbox_users": 12,
        "sandbox_hashtags": 6,
        "als_factors": 8,
        "api_port": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path / "data", redis_url)


def snapshot_size(index_dir: Path) -> int:
    """Vectors in the newest published snapshot; -1 before the first one."""
    index = SnapshotStore(index_dir).load()
    return -1 if index is None else index.ntotal


WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start real ``deeptarget worker`` processes; waits until each answers a ping; stops them at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        settings: Settings, queues: list[str], name: str, pool: str = "prefork", concurrency: int = 1
    ) -> subprocess.Popen[bytes]:
        log_file = tmp_path / f"worker-{name}.log"
        process = spawn_worker(settings, queues, name=name, pool=pool, concurrency=concurrency, log_file=log_file)
        started.append(process)
        wait_for_worker(settings, name, process, log_file)
        return process

    yield start
    stop_processes(started, timeout_s=20)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts itself (scraper, API); whatever is still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own (AOF on), to kill (``stop(kill=True)``) and start again on the same port and
    data (``start()``). Requested before ``start_worker``, so that the workers are stopped before it is."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_for_worker(settings: Settings, name: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    app = create_celery(settings)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        replies = app.control.ping(timeout=0.5) or []
        if any(key.startswith(f"{name}@") for reply in replies for key in reply):
            return
    raise RuntimeError(f"worker {name} did not answer a ping in 90 s:\n{log_file.read_text()[-3000:]}")
