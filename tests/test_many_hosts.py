"""Many hosts, no shared disk (issue 16): a scraper, an infer worker, the index writer and two API replicas, each
in a private data dir of its own, share only Redis, a PostgreSQL database and a bucket on a real S3-protocol server
process (moto_server behind a relay). Mid-run the bucket goes away and comes back, and one replica is killed with
SIGKILL and started again on an empty data dir. Every offered post must end indexed once or rejected with a reason,
nothing may wait in a queue or a dead letter, and both replicas must answer the same neighbours.
The run's time is printed (``pytest -s``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import redis

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.vectors import SnapshotStore
from deeptarget.runtime.embedded_redis import EmbeddedRedis, free_port
from deeptarget.sandbox import SandboxNetwork
from deeptarget.store.remote import attach, detach
from tests.conftest import WorkerFactory, make_settings
from tests.faults import http_status, kill_9, sandbox_in_thread
from tests.helpers import FAST_RECOVERY, everything, queues_quiet, spawn_cli
from tests.objectstore import TestBucket
from tests.postgres import LocalPostgres

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OUTAGE_S = 6.0


def wait_until(condition: Callable[[], object], what: str, alive: list[subprocess.Popen[bytes]], timeout_s: float,
               logs: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [p.args for p in alive if p.poll() is not None]
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(logs.glob("*.log")))
        assert not dead, f"a process exited while waiting for {what}: {dead}\n{tails}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}"
        time.sleep(0.25)


def rows(database_url: str) -> dict[str, tuple[str, str | None, int]]:
    with psycopg.connect(database_url) as db:
        found = db.execute("SELECT post_id, status, reason, vector_id FROM posts").fetchall()
    return {post_id: (status, reason, vid) for post_id, status, reason, vid in found}


def published_total(reader: Settings) -> int:
    """Vectors in the bucket's published snapshot, read as a further host would (its own empty dir)."""
    index = SnapshotStore(reader.index_dir).load()
    return -1 if index is None else index.ntotal


def similar(port: int, post_id: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/similar?post_id={post_id}&k=5", timeout=10) as answer:
            return [hit["post_id"] for hit in json.load(answer)["results"]]
    except OSError:
        return None


def test_five_processes_on_private_data_dirs_share_only_redis_postgres_and_a_bucket(
    tmp_path: Path,
    own_redis: EmbeddedRedis,
    postgres_server: LocalPostgres,
    bucket: TestBucket,
    start_worker: WorkerFactory,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    started = time.monotonic()
    network = SandboxNetwork(seed=161, n_posts=90, n_users=8, n_hashtags=5, corrupt_share=0.06)
    expected = everything(network)
    corrupted = {m.id for m in network.media if m.corruption is not None}
    database_url = postgres_server.create_database()
    logs = tmp_path / "logs"
    logs.mkdir()
    with sandbox_in_thread(network) as source_url:

        def host(name: str, **overrides: object) -> Settings:
            return make_settings(tmp_path / name, own_redis.url, database_url=database_url, source_url=source_url,
                                 hashtags=network.hashtags, accounts=[a.username for a in network.accounts],
                                 page_size=10, batch_size=4, token_calls=2, token_window_s=1.0, claim_ttl_s=5,
                                 outage_max_wait_s=1.0, **bucket.settings, **FAST_RECOVERY,
                                 **overrides)  # type: ignore[arg-type]  # fmt: skip

        writer_host, infer_host, scraper_host = host("index-writer"), host("infer"), host("scraper")
        replicas = {name: host(name, api_port=free_port()) for name in ("replica-1", "replica-2")}
        observer = host("observer")  # reads the bucket as one more host would, with nothing of its own
        attach(observer)
        workers = [
            start_worker(writer_host, [jobs.index_queue], "index", pool="solo"),
            start_worker(infer_host, [jobs.infer_queue, jobs.profiles_queue], "infer"),
        ]
        apis = {name: spawn_cli(s, logs / f"{name}.log", "serve") for name, s in replicas.items()}
        processes.extend(apis.values())
        for name, settings in replicas.items():
            wait_until(lambda s=settings: http_status(f"http://127.0.0.1:{s.api_port}/readyz") in (200, 503),
                       f"{name} to listen", [*workers, *apis.values()], 90, logs)  # fmt: skip
        scraper = spawn_cli(scraper_host, logs / "scraper.log", "scrape", "--forever", "--interval", "1")
        processes.append(scraper)
        alive = [*workers, *apis.values(), scraper]

        client = redis.Redis.from_url(own_redis.url)
        wait_until(lambda: client.scard(keys.seen_posts_key) >= 10, "ten posts crawled", alive, 180, logs)
        crawled_at_outage = int(client.scard(keys.seen_posts_key))
        assert crawled_at_outage < len(expected), "the crawl was over before the outage: it proves nothing"
        with bucket.away():  # the bucket restarts: connections reset, then refused, then it is back
            time.sleep(OUTAGE_S)
        kill_9(apis["replica-1"])  # one replica dies mid-run and comes back on an empty disk
        replicas["replica-1"] = host("replica-1-again", api_port=free_port())
        apis["replica-1"] = spawn_cli(replicas["replica-1"], logs / "replica-1-again.log", "serve")
        processes.append(apis["replica-1"])
        alive = [*workers, *apis.values(), scraper]

        def settled() -> bool:
            stored = rows(database_url)
            if set(stored) != expected or any(s not in ("indexed", "rejected") for s, _, _ in stored.values()):
                return False
            indexed_count = sum(s == "indexed" for s, _, _ in stored.values())
            return published_total(observer) == indexed_count and queues_quiet(client)

        wait_until(settled, "every offered post indexed or rejected, the bucket's index holding them", alive, 300, logs)
        stored = rows(database_url)
        done = {p for p, (s, _, _) in stored.items() if s == "indexed"}
        probes = sorted(done)[:8]
        ports = [s.api_port for s in replicas.values()]
        wait_until(lambda: all(similar(port, p) and similar(port, p) == similar(ports[0], p) for p in probes
                               for port in ports), "both replicas to answer the same neighbours", alive, 60,
                   logs)  # fmt: skip
        for post_id in probes:
            assert similar(ports[0], post_id)[0] == post_id  # type: ignore[index]
        elapsed = time.monotonic() - started

        assert not client.xrange(keys.deadletter_stream), "a dead letter"
        felt = "".join(p.read_text(errors="replace") for p in [*logs.glob("*.log"), *tmp_path.glob("worker-*.log")])
        assert "StorageUnavailable" in felt or "unavailable (" in felt, "the outage hit no process: it proves nothing"
        rejected = {p: reason for p, (status, reason, _) in stored.items() if status == "rejected"}
        assert all(rejected.values()), f"rejected without a reason: {rejected}"
        assert set(rejected) <= corrupted, f"sound posts rejected: {set(rejected) - corrupted}"
        index = SnapshotStore(observer.index_dir).load()
        assert index is not None and index.ntotal == len(done)
        assert all(vector_id(p) in index for p in done)
        # Nothing crossed a disk: the infer worker read every image from the bucket, not from the scraper's dir.
        assert not (infer_host.blob_dir / "tmp").exists() or not list((infer_host.blob_dir / "tmp").iterdir())
        assert len(bucket.objects("blobs/")) >= len(done)
        for process in [*workers, *apis.values(), scraper]:
            process.send_signal(signal.SIGTERM)
    detach(observer)
    print(
        f"\nmany hosts: {len(done)} indexed and {len(rejected)} rejected of {len(expected)} offered, across 5 "
        f"private data dirs; bucket away {OUTAGE_S:.0f} s with {crawled_at_outage} crawled, one replica killed and "
        f"restarted empty; settled in {elapsed:.1f} s"
    )
