"""New vectors reach readers on their own: the writer's deferred snapshot publishes a trickle of adds (or removals)
without any further add, flush task or call to snapshot(). Real writer, real snapshot files, real reader; waits poll
with a generous timeout and nothing asserts on time (speed lives in bench/latency.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeptarget.core.records import Post, Prediction, vector_id
from deeptarget.index import writer as writer_module
from deeptarget.index.segments import LiveReader
from deeptarget.index.vectors import SnapshotStore
from deeptarget.index.writer import IndexWriter
from deeptarget.store.metadata import MetadataStore
from tests.conftest import wait_for

MODEL = "mobilenet_v2:random0:imagenet:96"


def _record(store: MetadataStore, ids: list[str], seed: int = 0) -> list[str]:
    """Embedded posts in the store, as the infer task leaves them for the index task."""
    vectors = np.random.default_rng(seed).normal(size=(len(ids), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.record_results(
        (Post(id=pid), None, Prediction(post_id=pid, status="embedded", model_id=MODEL), v)
        for pid, v in zip(ids, vectors, strict=True)
    )
    return ids


def _holds(reader: LiveReader, post_ids: list[str]) -> bool:
    index = reader.get()
    return index is not None and all(vector_id(p) in index for p in post_ids)


def test_a_trickle_of_adds_reaches_readers_without_another_add(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "meta.sqlite3")
    snapshots = SnapshotStore(tmp_path / "index", keep=2)
    writer = IndexWriter(store, snapshots, snapshot_every_s=0.5)
    reader = LiveReader(snapshots, check_interval_s=0)
    writer.add(store.embeddings(_record(store, ["a", "b", "c"])))  # the first snapshot: published at once
    assert _holds(reader, ["a", "b", "c"])
    for seed, batch in enumerate((["d"], ["e", "f", "g"]), 1):  # right after it: these wait for the deferred one
        writer.add(store.embeddings(_record(store, batch, seed)))
    wait_for(lambda: _holds(reader, list("abcdefg")), "the deferred snapshot to reach the reader", timeout_s=10)
    for seed, batch in enumerate((["h"], ["i"]), 3):  # later ones, one at a time
        writer.add(store.embeddings(_record(store, batch, seed)))
        wait_for(lambda: _holds(reader, batch), f"the reader to see {batch}", timeout_s=10)  # noqa: B023
    assert reader.get().ntotal == 9
    writer.close()  # waits for a snapshot in progress (readers may see it before its sweep of old versions)
    # a snapshot every half second keeps only `keep` versions and leaves no temporary file
    assert len(snapshots.versions.versions()) <= 2
    assert not list((tmp_path / "index").glob(".*tmp*"))


def test_a_removal_reaches_readers_without_another_change(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "meta.sqlite3")
    ids = _record(store, [f"p{i}" for i in range(5)])
    snapshots = SnapshotStore(tmp_path / "index")
    writer = IndexWriter(store, snapshots, snapshot_every_s=0.2)  # the replay of the 5 stored rows is published
    reader = LiveReader(snapshots, check_interval_s=0)
    assert _holds(reader, ids)
    deleted, _ = store.delete_posts(["p2"])
    writer.remove(deleted)
    wait_for(lambda: reader.get().ntotal == 4, "the removal to reach the reader", timeout_s=10)
    assert vector_id("p2") not in reader.get()
    writer.close()


def test_close_publishes_what_the_deferred_snapshot_had_not_yet(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "meta.sqlite3")
    snapshots = SnapshotStore(tmp_path / "index")
    writer = IndexWriter(store, snapshots, snapshot_every_s=3600)
    writer.add(store.embeddings(_record(store, ["a", "b"])))  # no snapshot yet: published at once
    assert snapshots.load().ntotal == 2
    writer.add(store.embeddings(_record(store, ["c", "d"], seed=1)))
    assert snapshots.load().ntotal == 2  # the next snapshot is an hour away
    assert writer.close() is not None  # the worker's clean stop
    assert snapshots.load().ntotal == 4
    assert writer.close() is None  # nothing left to publish


def test_temporary_files_of_a_writer_that_died_are_swept(tmp_path: Path) -> None:
    """No live writer holds the directory's lock: every temporary file is a dead writer's, whatever pid it names (in
    a container the new writer often gets the dead one's pid: ours stands for it here)."""
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        index_dir / f".v000007.faiss.tmp-{dead.pid}",
        index_dir / f".CURRENT.tmp-{dead.pid}",
        index_dir / f".v000008.faiss.tmp-{os.getpid()}",  # a reused pid
    ]
    for path in stale:
        path.write_bytes(b"half a snapshot")
    IndexWriter(MetadataStore(tmp_path / "meta.sqlite3"), SnapshotStore(index_dir)).close()
    assert not any(p.exists() for p in stale)


def test_a_live_writers_temporary_file_stays(tmp_path: Path) -> None:
    """Another live writer holds the lock (a mistake, but its snapshot in progress is not ours to delete): only the
    files of dead pids go."""
    index_dir = tmp_path / "index"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from deeptarget.index.vectors import "
         f"SnapshotStore; s = SnapshotStore(Path({str(index_dir)!r})); assert s.lock_for_writing(); "
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        theirs = index_dir / f".v000003.faiss.tmp-{holder.pid}"
        stale = index_dir / f".v000002.faiss.tmp-{dead.pid}"
        for path in (theirs, stale):
            path.write_bytes(b"half a snapshot")
        IndexWriter(MetadataStore(tmp_path / "meta.sqlite3"), SnapshotStore(index_dir)).close()
        assert theirs.exists() and not stale.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_snapshot_that_cannot_be_written_is_tried_again_and_fails_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13, item 7: a full disk failed the index task whose add asked for the snapshot (a dead letter each
    time). The add is journalled and in the index: the snapshot is deferred and tried again, later each time."""
    monkeypatch.setattr(writer_module, "RETRY_FAILED_SNAPSHOT_S", 0.2)
    store = MetadataStore(tmp_path / "meta.sqlite3")
    snapshots = SnapshotStore(tmp_path / "index")
    writer = IndexWriter(store, snapshots, snapshot_every_s=0)
    reader = LiveReader(snapshots, check_interval_s=0)
    writer.add(store.embeddings(_record(store, ["a", "b"])))
    assert reader.get().ntotal == 2
    # The next snapshot's first file is written through /dev/full: the kernel's own ENOSPC, once.
    (tmp_path / "index" / f".v000002.json.tmp-{os.getpid()}").symlink_to("/dev/full")
    assert writer.add(store.embeddings(_record(store, ["c"], seed=1))) == 1  # no error for the add
    wait_for(lambda: reader.get().ntotal == 3, "the snapshot tried again", timeout_s=10)
    assert "index snapshot failed (OSError: [Errno 28] No space left on device, 1 in a row)" in caplog.text
    assert writer.status()["snapshot_failures"] == 0 and store.status_counts() == {"indexed": 3}
    writer.close()
