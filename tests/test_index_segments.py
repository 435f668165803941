"""Readers follow the writer through the change stream (a real Redis): a base snapshot plus a delta segment answers
what exact search over the live set would, a replaced vector never comes back in its old form, and a writer killed
while it seals loses and duplicates nothing. Real writer, real snapshot files, real Redis, real processes."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from deeptarget.core.records import Post, Prediction, vector_id
from deeptarget.index.builder import IndexPolicy, recall_at_k
from deeptarget.index.deltas import DeltaStream
from deeptarget.index.segments import LiveIndex, LiveReader
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import SnapshotStore
from deeptarget.index.writer import IndexWriter
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.store.metadata import MetadataStore
from tests.conftest import wait_for

MODEL = "mobilenet_v2:random0:imagenet:96"
DIM = 32


def _record(store: MetadataStore, vectors: dict[str, np.ndarray]) -> list[str]:
    """Embedded posts in the store, as the infer task leaves them for the index task."""
    store.record_results(
        (Post(id=pid), None, Prediction(post_id=pid, status="embedded", model_id=MODEL), v)
        for pid, v in vectors.items()
    )
    return list(vectors)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> np.ndarray:
    ids = np.array(list(live), np.int64)
    scores = queries @ np.stack(list(live.values())).T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


class Fixture:
    def __init__(self, tmp_path: Path, redis_url: str, **writer_options: object) -> None:
        self.store = MetadataStore(tmp_path / "meta.sqlite3")
        self.snapshots = SnapshotStore(tmp_path / "index", keep=2)
        self.url = redis_url
        options: dict[str, object] = {"seal_every_s": 3600, "seal_every_changes": 10**6} | writer_options
        self.writer = IndexWriter(self.store, self.snapshots, deltas=DeltaStream.from_url(redis_url), **options)  # type: ignore[arg-type]
        self.live: dict[int, np.ndarray] = {}  # what exact search over the live set searches

    def reader(self) -> LiveReader:
        return LiveReader(SnapshotStore(self.snapshots.versions.root), DeltaStream.from_url(self.url), block_ms=50)

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        self.writer.add(self.store.embeddings(_record(self.store, vectors)))
        self.live.update({vector_id(p): v for p, v in vectors.items()})

    def remove(self, post_ids: list[str]) -> None:
        deleted, _ = self.store.delete_posts(post_ids)
        self.writer.remove(deleted)
        for p in post_ids:
            self.live.pop(vector_id(p), None)

    def caught_up(self, reader: LiveReader) -> LiveIndex:
        """The reader's index once it holds exactly the live set, each id with its newest vector."""

        def holds() -> bool:
            index = reader.get()
            if index is None or index.ntotal != len(self.live):
                return False
            return all(
                (got := index.reconstruct(i)) is not None and np.allclose(got, v, rtol=0, atol=1e-6)
                for i, v in self.live.items()
            )

        wait_for(holds, "the reader to apply the writer's changes", timeout_s=20)
        index = reader.get()
        assert index is not None
        return index


def test_changes_reach_readers_through_the_stream_without_a_snapshot(tmp_path: Path, redis_url: str) -> None:
    f = Fixture(tmp_path, redis_url)
    rng = np.random.default_rng(0)
    f.add({f"p{i}": v for i, v in enumerate(_unit(rng, 50))})
    f.writer.snapshot()  # the base
    reader = f.reader()
    f.caught_up(reader)
    versions = f.snapshots.versions.versions()
    f.add({f"n{i}": v for i, v in enumerate(_unit(rng, 5))})  # new posts: in the delta
    f.remove(["p3", "n1"])  # a base post and a delta post: tombstoned, dropped
    old = f.live[vector_id("p7")]
    replaced = _unit(rng, 1)[0]
    f.add({"p7": replaced})  # re-embedded: the base's copy is tombstoned
    index = f.caught_up(reader)
    assert f.snapshots.versions.versions() == versions  # no snapshot was needed
    np.testing.assert_array_equal(index.reconstruct(vector_id("p7")), replaced)
    assert vector_id("p3") not in index and vector_id("n1") not in index
    scores, ids = index.search(old[None], 5)  # the old vector's own query: p7 only with its new vector's score
    for score, found in zip(scores[0], ids[0], strict=True):
        if found == vector_id("p7"):
            assert score == pytest.approx(float(old @ replaced), abs=1e-5)
    assert len(set(ids[0].tolist())) == len(ids[0])
    f.writer.close()
    reader.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf+graph"])
def test_a_reader_under_adds_and_removals_answers_as_exact_search_over_the_live_set(
    tmp_path: Path, redis_url: str, kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random adds, removals and replacements, a seal in the middle, and a reader started late (on a trimmed
    stream): every answer is exact search's over the live set (flat), or within the recall target (IVF; with
    ``+graph`` the readers find a query's lists through a graph of the centroids, as they do from 1,024 lists on)."""
    caplog.set_level(logging.INFO, "deeptarget.index.segments")
    graph = kind.endswith("+graph")
    kind = kind.removesuffix("+graph")
    monkeypatch.setattr("deeptarget.index.vectors.CENTROID_GRAPH_FROM", 1 if graph else 10**9)
    policy = IndexPolicy(ivf_from=1000 if kind == "ivf" else 10**6, regrow_factor=100)
    f = Fixture(tmp_path, redis_url, policy=policy)
    data = ClusteredVectors(dim=DIM, n_clusters=40, n_groups=8, rank=8, seed=1)
    vectors = data.sample(6000)
    rng = np.random.default_rng(2)
    f.add({f"p{i}": v for i, v in enumerate(vectors[:3000])})
    f.writer.wait_for_build()
    f.writer.snapshot()
    early = f.reader()
    assert early.get() is not None
    next_new = 3000
    for round_ in range(12):
        f.add({f"p{i}": vectors[i] for i in range(next_new, next_new + 200)})  # new posts
        next_new += 200
        replaced = rng.choice(sorted(f.live), 30, replace=False)
        by_vid = {vector_id(f"p{i}"): f"p{i}" for i in range(next_new)}
        fresh = data.sample(len(replaced), stream=100 + round_)
        f.add({by_vid[int(v)]: fresh[j] for j, v in enumerate(replaced) if int(v) in by_vid})
        gone = [by_vid[int(v)] for v in rng.choice(sorted(f.live), 40, replace=False) if int(v) in by_vid]
        f.remove(gone)
        if round_ == 5:
            f.writer.snapshot()  # a seal mid-stream; the early reader moves to it
        if round_ == 8:
            f.writer.snapshot()  # a second seal trims the stream behind the first
    late = f.reader()
    wait_for(lambda: (live := early.get()) is not None and live.version == f.writer.version, "the early reader's base")
    assert "carried over" in caplog.text  # a newer base took the early reader's delta over, not a rebuilt one
    queries = data.sample(200, stream=7)
    exact = _exact(f.live, queries, 10)
    for reader in (early, late):
        index = f.caught_up(reader)
        _, found = index.search(queries, 10)
        assert all(len(set(row.tolist())) == 10 for row in found)  # no id twice: no stale copy beside its new one
        assert index.kind == kind
        assert index.base.probes_by_graph == graph
        if kind == "flat":
            np.testing.assert_array_equal(found, exact)
        else:
            assert recall_at_k(found, exact, np.full(len(queries), -1), 10) >= policy.target_recall
        for vid in list(f.live)[::97]:
            np.testing.assert_allclose(index.reconstruct(vid), f.live[vid], rtol=0, atol=1e-6)  # type: ignore[arg-type]
    f.writer.close()
    early.close()
    late.close()


def test_a_reader_keeps_serving_through_a_redis_outage_and_catches_up(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        f = Fixture(tmp_path, server.url, snapshot_every_s=0.2)
        rng = np.random.default_rng(3)
        f.add({f"p{i}": v for i, v in enumerate(_unit(rng, 20))})
        f.writer.snapshot()
        reader = f.reader()
        f.caught_up(reader)
        server.stop(kill=True)
        f.add({f"q{i}": v for i, v in enumerate(_unit(rng, 3))})  # the stream is down: snapshots carry these
        assert not f.writer.streaming
        index = f.caught_up(reader)  # through a snapshot, while Redis is away; the reader answered throughout
        assert index.search(_unit(rng, 1), 3)[1].shape == (1, 3)
        server.start()
        more = itertools.count()  # the writer tries the stream again after a short pause, at an add
        wait_for(lambda: f.add({f"s{next(more)}": _unit(rng, 1)[0]}) or f.writer.streaming, "the stream again")
        f.add({f"t{i}": v for i, v in enumerate(_unit(rng, 3))})
        f.caught_up(reader)
        f.writer.close()
        reader.close()
    finally:
        server.stop()


WRITER = """
import sys, time
import numpy as np
from deeptarget.core.records import Post, Prediction
from deeptarget.index import writer as writer_module
from deeptarget.index.deltas import DeltaStream
from deeptarget.index.vectors import SnapshotStore
from deeptarget.index.writer import IndexWriter
from deeptarget.store.metadata import MetadataStore

writer_module.FORK_FROM_BYTES = 0  # every snapshot is written by a forked child, as a large index's is
root, url, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = MetadataStore(root + "/meta.sqlite3")
writer = IndexWriter(store, SnapshotStore(root + "/index", keep=2), deltas=DeltaStream.from_url(url),
                     seal_every_s=0.05, seal_every_changes=50)
rng = np.random.default_rng(start)
print("ready", flush=True)
for batch in range(start, 10**6):
    ids = [f"p{batch}-{i}" for i in range(20)]
    vectors = rng.normal(size=(20, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.record_results((Post(id=p), None, Prediction(post_id=p, status="embedded", model_id="m"), v)
                         for p, v in zip(ids, vectors))
    writer.add(store.embeddings(ids))
    if batch % 3 == 0:
        deleted, _ = store.delete_posts([f"p{batch - 1}-0", f"p{batch - 2}-5"])
        writer.remove(deleted)
    if batch % 5 == 0:  # a replacement of a stored post
        p = f"p{batch - 1}-3"
        store.record_results([(Post(id=p), None, Prediction(post_id=p, status="embedded", model_id="m"),
                               vectors[0])])
        writer.add(store.embeddings([p]))
"""


def test_a_writer_killed_while_it_seals_loses_and_duplicates_nothing(tmp_path: Path, redis_url: str) -> None:
    """kill -9 of the writer at random moments of a stream with a seal every 50 changes (each a forked write), and
    once of the forked child alone: after a restart the index is the store's live set, each id once, in the writer
    and in a reader that followed throughout."""
    rng = np.random.default_rng(4)
    reader = LiveReader(SnapshotStore(tmp_path / "index"), DeltaStream.from_url(redis_url), block_ms=50)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for round_ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), redis_url, str(1000 * (round_ + 1))],
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
            time.sleep(float(rng.uniform(0.5, 1.5)))
            if round_ == 2:  # the forked child mid-write: the writer must retry the snapshot and go on
                deadline = time.monotonic() + 10
                while not (children := _children(process.pid)):  # a seal every 50 changes: one is written soon
                    assert time.monotonic() < deadline, "no forked snapshot writer seen"
                    time.sleep(0.001)
                for child in children:
                    os.kill(child, signal.SIGKILL)
                time.sleep(0.5)
                assert process.poll() is None  # the writer lives on (and writes that snapshot again)
        finally:
            process.kill()
            process.wait()
        reader.get()
    store = MetadataStore(tmp_path / "meta.sqlite3")
    writer = IndexWriter(store, SnapshotStore(tmp_path / "index"), deltas=DeltaStream.from_url(redis_url))
    live = {int(v) for rows in store.embeddings_of_model("m") for v in rows.vector_ids}
    assert writer.index is not None and writer.index.ntotal == len(live) > 500
    assert all(v in writer.index for v in list(live)[::7])
    assert not list((tmp_path / "index").glob(".*tmp*"))  # the dead writers' temporary snapshots were swept
    wait_for(lambda: reader.get() is not None and reader.get().ntotal == len(live), "the reader to catch up",  # type: ignore[union-attr]
             timeout_s=20)  # fmt: skip
    index = reader.get()
    assert index is not None
    queries = np.random.default_rng(5).normal(size=(20, 32)).astype(np.float32)
    _, found = index.search(queries, 20)
    assert all(len(set(row.tolist())) == 20 for row in found)
    assert set(found.ravel().tolist()) <= live
    writer.close()
    reader.close()


def _children(pid: int) -> list[int]:
    """The processes ``pid``'s threads forked (each thread lists its own children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def test_redis_is_only_needed_for_freshness(tmp_path: Path) -> None:
    """A writer whose stream cannot be reached at its start still indexes and publishes by snapshots."""
    store = MetadataStore(tmp_path / "meta.sqlite3")
    deltas = DeltaStream(redis.Redis(port=1, socket_connect_timeout=0.2))  # nothing listens there
    writer = IndexWriter(store, SnapshotStore(tmp_path / "index"), deltas=deltas, snapshot_every_s=0.1)
    writer.add(store.embeddings(_record(store, {"a": _unit(np.random.default_rng(6), 1)[0]})))
    assert not writer.streaming
    wait_for(lambda: (s := SnapshotStore(tmp_path / "index").load()) is not None and s.ntotal == 1, "a snapshot")
    writer.close()
