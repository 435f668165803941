"""A task that keeps failing transiently is retried with backoff, then kept as a dead letter that the CLI lists and
sends again: nothing it carried is lost (real worker, real Redis, the real command line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import Post, PostRef
from deeptarget.core.settings import Settings
from deeptarget.jobs import Jobs
from deeptarget.sandbox import SandboxNetwork
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from tests.conftest import WorkerFactory, make_settings, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | settings.to_env()
    done = subprocess.run(
        [sys.executable, "-m", "deeptarget", "deadletter", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def test_retries_then_dead_letter_then_retry_from_the_cli(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    settings = make_settings(
        tmp_path / "data", redis_url, face_policy="off", task_max_retries=2, task_retry_backoff_s=0.2
    )
    blobs = BlobStore(settings.blob_dir)
    media = SandboxNetwork(seed=8, n_posts=3, corrupt_share=0.0).media
    refs = [PostRef(post=Post(id=m.id), blob=blobs.put(m.image_bytes())) for m in media]
    # The blob store breaks under one of the posts: an I/O error, not a missing blob, so the task must not reject it.
    shard = blobs.path(refs[1].blob or "").parent.parent
    saved = tmp_path / "saved-shard"
    shutil.move(shard, saved)
    shard.write_text("a volume that went away")

    start_worker(settings, [jobs.infer_queue], "flaky")
    Jobs.for_settings(settings).infer(refs)
    wait_for(lambda: redis_client.xlen(keys.deadletter_stream) == 1, "the dead letter")

    listed = json.loads(run_cli(settings, "list", "--json").stdout)
    assert len(listed) == 1
    letter = listed[0]
    assert letter["task"] == jobs.infer_task and letter["retries"] == 2
    assert "BlobStoreUnavailable" in letter["error"] and "unreadable" in letter["error"]
    assert [r["post"]["id"] for r in letter["args"][0]] == [m.id for m in media]
    table = run_cli(settings, "list").stdout
    assert "1 dead letters" in table and jobs.infer_task in table
    store = MetadataStore(settings.metadata_database)
    assert store.status_counts() == {}, "a failed batch must not half-record its posts"

    shard.unlink()
    shutil.move(saved, shard)
    assert "sent 1 dead letters" in run_cli(settings, "retry", "--all").stdout
    wait_for(lambda: store.status_counts().get("embedded", 0) == 3, "the retried batch")
    assert redis_client.xlen(keys.deadletter_stream) == 0
    assert "0 dead letters" in run_cli(settings, "list").stdout
