"""A worker serves Prometheus metrics summed over its pool processes (which do the counting)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from deeptarget import jobs
from deeptarget.core.records import Post, PostRef
from deeptarget.jobs import Jobs
from deeptarget.runtime.embedded_redis import free_port
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from tests.conftest import WorkerFactory, make_settings, wait_for
from tests.helpers import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_posts_counted_by_the_pool_processes_are_served_by_the_worker(
    tmp_path: Path, redis_url: str, start_worker: WorkerFactory
) -> None:
    make_dataset(tmp_path / "photos", per_class=4)
    port = free_port()
    settings = make_settings(tmp_path / "data", redis_url, worker_metrics_port=port)
    start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "metered", concurrency=2)
    blobs = BlobStore(settings.blob_dir)
    refs = [
        PostRef(post=Post(id=f"p{i}"), blob=blobs.put(path.read_bytes())).model_dump(mode="json")
        for i, path in enumerate(sorted((tmp_path / "photos").rglob("*.jpg")))
    ]  # 12 photos and one broken file
    send = Jobs.for_settings(settings)
    for start in range(0, len(refs), 3):  # several tasks, so both pool processes get some
        send.infer(refs[start : start + 3])
    store = MetadataStore(settings.metadata_database)
    wait_for(lambda: sum(store.status_counts().values()) == len(refs), "every post processed", 120)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert _metric(text, 'deeptarget_worker_posts_total{outcome="embedded"}') == 12
    assert _metric(text, 'deeptarget_worker_posts_total{outcome="rejected"}') == 1
    assert list((settings.data_dir / "metrics" / "metered").glob("counter_*.db"))  # where the pool processes count
