from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget.core.errors import IndexMismatchError
from deeptarget.core.records import Post, Prediction, vector_id
from deeptarget.index.segments import LiveReader
from deeptarget.index.vectors import SnapshotStore, VectorIndex
from deeptarget.index.writer import IndexWriter
from deeptarget.store.metadata import MetadataStore

MODEL = "mobilenet_v2:random0:imagenet:96"


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_upsert_replaces_ids_and_search_matches_exact_search() -> None:
    rng = np.random.default_rng(0)
    index = VectorIndex.empty(16, MODEL)
    vectors = unit(rng, 200)
    ids = np.arange(1000, 1200, dtype=np.int64)
    index.upsert(ids, vectors)
    index.upsert(ids[:50], vectors[:50])  # re-adding replaces, never duplicates
    assert index.ntotal == 200
    queries = unit(rng, 5)
    scores, found = index.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[exact])
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_replaced_vector_is_the_new_one_and_removal_works() -> None:
    rng = np.random.default_rng(1)
    index = VectorIndex.empty(16, MODEL)
    first, second = unit(rng, 2)
    index.upsert(np.array([7]), first[None])
    index.upsert(np.array([7, 7]), np.stack([first, second]))  # a repeated id in one batch: the last one wins
    np.testing.assert_allclose(index.reconstruct(7), second)
    assert index.remove(np.array([7])) == 1
    assert 7 not in index and index.reconstruct(7) is None


def test_search_on_an_empty_index_returns_no_ids() -> None:
    _, ids = VectorIndex.empty(16, MODEL).search(np.zeros(16, np.float32), 3)
    assert ids.tolist() == [[-1, -1, -1]]


def test_mixing_models_is_refused() -> None:
    with pytest.raises(IndexMismatchError):
        VectorIndex.empty(16, MODEL).check_compatible(16, "resnet50:imagenet:imagenet:224")


def test_snapshots_are_versioned_and_readers_follow_the_newest(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    snapshots = SnapshotStore(tmp_path, keep=2)
    reader = LiveReader(snapshots, check_interval_s=0)
    assert reader.get() is None
    index = VectorIndex.empty(16, MODEL)
    index.upsert(np.array([1, 2]), unit(rng, 2))
    assert snapshots.save(index) == 1
    assert reader.get().ntotal == 2
    index.upsert(np.array([3]), unit(rng, 1))
    for _ in range(3):
        snapshots.save(index)
    assert reader.get().ntotal == 3
    assert snapshots.versions.versions() == [3, 4]  # older versions pruned
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def _store_with_posts(path: Path, n: int, model_id: str = MODEL, start: int = 0) -> tuple[MetadataStore, list[str]]:
    store = MetadataStore(path)
    rng = np.random.default_rng(start)
    ids = [f"p{start + i}" for i in range(n)]
    store.record_results(
        (Post(id=pid), None, Prediction(post_id=pid, status="embedded", model_id=model_id), v)
        for pid, v in zip(ids, unit(rng, n), strict=True)
    )
    return store, ids


def test_a_crash_between_snapshots_loses_nothing(tmp_path: Path) -> None:
    store, ids = _store_with_posts(tmp_path / "meta.sqlite3", 30)
    snapshots = SnapshotStore(tmp_path / "index")
    writer = IndexWriter(store, snapshots, snapshot_every_adds=10_000, snapshot_every_s=3600)
    writer.add(store.embeddings(ids[:10]))
    writer.snapshot()
    writer.add(store.embeddings(ids[10:20]))  # indexed, then the process dies before the next snapshot
    del writer
    restarted = IndexWriter(store, snapshots)  # replays what the store holds beyond the snapshot
    assert restarted.index is not None and restarted.index.ntotal == 30
    assert SnapshotStore(tmp_path / "index").load().ntotal == 30
    assert store.status_counts() == {"indexed": 30}


def test_reindexing_a_post_never_duplicates_it(tmp_path: Path) -> None:
    store, ids = _store_with_posts(tmp_path / "meta.sqlite3", 5)
    writer = IndexWriter(store, SnapshotStore(tmp_path / "index"))
    for _ in range(3):
        writer.add(store.embeddings(ids))
    assert writer.index.ntotal == 5


def test_embeddings_of_another_model_are_not_mixed_in(tmp_path: Path) -> None:
    store, _ = _store_with_posts(tmp_path / "meta.sqlite3", 4)
    _store_with_posts(tmp_path / "meta.sqlite3", 3, model_id="resnet50:imagenet:imagenet:224", start=100)
    writer = IndexWriter(store, SnapshotStore(tmp_path / "index"))
    assert writer.index.ntotal == 4  # the replay took the first model's rows; the others were refused


def test_rebuild_from_the_metadata_store(tmp_path: Path) -> None:
    store, _ = _store_with_posts(tmp_path / "meta.sqlite3", 12)
    writer = IndexWriter(store, SnapshotStore(tmp_path / "index"))
    assert writer.rebuild() == 12
    assert SnapshotStore(tmp_path / "index").load().ntotal == 12


def test_deleted_posts_leave_the_index_even_across_a_crash(tmp_path: Path) -> None:
    store, _ = _store_with_posts(tmp_path / "meta.sqlite3", 20)
    snapshots = SnapshotStore(tmp_path / "index")
    writer = IndexWriter(store, snapshots, snapshot_every_adds=10_000, snapshot_every_s=3600)
    writer.snapshot()
    deleted, _ = store.delete_posts(["p1", "p2", "nope"])
    assert deleted == ["p1", "p2"]
    assert writer.remove(deleted) == 2 and writer.index.ntotal == 18  # removed, then the process dies unsnapshotted
    store.delete_posts(["p3"])  # deleted, and the writer died before its remove task ran
    restarted = IndexWriter(store, snapshots)
    assert restarted.index.ntotal == 17
    assert all(vector_id(p) not in restarted.index for p in ("p1", "p2", "p3"))
    # a late infer result (at-least-once delivery) does not bring a deleted post back
    store.record_results([(Post(id="p1"), None, Prediction(post_id="p1", status="embedded", model_id=MODEL),
                           unit(np.random.default_rng(9), 1)[0])])  # fmt: skip
    assert store.post("p1").status == "deleted" and store.embeddings(["p1"]).post_ids == []


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_readers_map_snapshots_and_serve_them_after_a_prune_deletes_the_file(tmp_path: Path, kind: str) -> None:
    """A reader maps the snapshot (no copy of its own, no second copy while it moves to the next): it answers as
    the writer's index does, gives back stored vectors, refuses changes, and keeps serving when the writer prunes
    the file away under it."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 11 + 5
    index = VectorIndex.empty(16, "m") if kind == "flat" else VectorIndex.trained_ivf(16, "m", vectors, 16)
    index.upsert(ids, vectors)
    index.nprobe = 4
    store = SnapshotStore(tmp_path / "index", keep=1)
    store.save(index)
    reader = LiveReader(SnapshotStore(tmp_path / "index"), check_interval_s=0)
    served = reader.get()
    assert served is not None and served.kind == kind and served.nprobe == index.nprobe
    for want, got in zip(index.search(vectors[:20], 5), served.search(vectors[:20], 5), strict=True):
        np.testing.assert_array_equal(want, got)
    np.testing.assert_array_equal(served.reconstruct(int(ids[7])), vectors[7])
    with pytest.raises(RuntimeError):
        served.base.upsert(np.array([1], np.int64), vectors[:1])  # read-only: only the writer changes an index
    first = served
    store.save(index)  # keep=1: the served version's files are deleted
    assert not list((tmp_path / "index").glob("v000001*"))
    np.testing.assert_array_equal(first.search(vectors[:3], 3)[1], index.search(vectors[:3], 3)[1])
    assert reader.get() is not first and reader.get().version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_mapped_index_answers_membership_from_its_ids(tmp_path: Path, kind: str) -> None:
    """A reader's base answers which ids it holds from its sorted ids (``index_ids``), as the writer's changeable
    index answers by a lookup each: removed ids and ids never added are not held."""
    rng = np.random.default_rng(6)
    vectors = unit(rng, 2000)
    ids = np.arange(2000, dtype=np.int64) * 11 + 5
    index = VectorIndex.empty(16, "m") if kind == "flat" else VectorIndex.trained_ivf(16, "m", vectors, 16)
    index.upsert(ids, vectors)
    index.remove(ids[:100])
    store = SnapshotStore(tmp_path / "index")
    store.save(index)
    mapped = store.load(mapped=True)
    assert mapped is not None
    asked = np.concatenate([ids, ids + 1, np.array([-1, 2**62], np.int64)])  # held, removed, never added
    wanted = index.holds(asked)
    assert wanted.sum() == 1900 and not index.index_ids()  # the writer's ids change: no array of them
    assert mapped.index_ids()
    np.testing.assert_array_equal(mapped.holds(asked), wanted)
    store.save(VectorIndex.empty(16, "m"))
    empty = store.load(mapped=True)
    assert empty is not None and empty.index_ids() and not empty.holds(asked).any()
