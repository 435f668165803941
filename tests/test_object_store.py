"""The object store on a real S3-protocol server process (moto_server on loopback, behind a relay the tests stop):
objects whole or absent, blobs written on one host and read on another, versioned artefacts published by writing the
objects and then the pointer, a bounded cache, and a bucket outage that is an outage (``StorageUnavailable``), never
a missing object."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from deeptarget.core.settings import Settings
from deeptarget.index.segments import LiveReader
from deeptarget.index.vectors import SnapshotStore, VectorIndex
from deeptarget.models.hashtags import HashtagModel
from deeptarget.models.heads import HeadSet, LinearHead, head_names, publish_head
from deeptarget.store.blobs import BlobStore, StorageUnavailable
from deeptarget.store.bucket import Bucket
from deeptarget.store.remote import attach, detach
from deeptarget.store.versioned import VersionedDir
from tests.conftest import make_settings
from tests.objectstore import TestBucket


def host(tmp_path: Path, bucket: TestBucket, name: str, **overrides: object) -> Settings:
    """The settings of one host: a private data dir of its own, the shared bucket."""
    settings = make_settings(tmp_path / name, **{**bucket.settings, **overrides})  # type: ignore[arg-type]
    attach(settings)
    return settings


@pytest.fixture
def two_hosts(tmp_path: Path, bucket: TestBucket):  # type: ignore[no-untyped-def]
    a, b = host(tmp_path, bucket, "a"), host(tmp_path, bucket, "b")
    yield a, b
    detach(a)
    detach(b)


def test_objects_are_whole_or_absent_and_missing_is_not_an_outage(bucket: TestBucket, tmp_path: Path) -> None:
    store = attach(host(tmp_path, bucket, "a"))
    assert isinstance(store, Bucket)
    assert store.put_bytes("x/one", b"1", if_absent=True)
    assert not store.put_bytes("x/one", b"2", if_absent=True), "a conditional write over an object must not land"
    assert store.get_bytes("x/one") == b"1"
    with pytest.raises(FileNotFoundError):
        store.get_bytes("x/none")
    with pytest.raises(FileNotFoundError):
        store.get_file("x/none", tmp_path / "none")
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.part-*")), "a failed download left a file"
    big = tmp_path / "big"
    big.write_bytes(np.random.default_rng(0).bytes(3_000_000))
    store.put_file("x/big", big)
    store.get_file("x/big", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == big.read_bytes()
    assert sorted(store.names("x/")) == ["x/big", "x/one"]
    with pytest.raises(OSError, match="larger than"):
        store.get_bytes("x/big", max_bytes=1000)


def test_an_unreachable_bucket_is_an_outage_for_every_operation_and_passes(bucket: TestBucket, tmp_path: Path) -> None:
    store = attach(host(tmp_path, bucket, "a"))
    assert store is not None
    store.put_bytes("k", b"v")
    started = time.monotonic()
    with bucket.away():
        for call in (lambda: store.get_bytes("k"), lambda: store.put_bytes("k2", b"v"), store.probe,
                     lambda: store.names(""), lambda: store.exists("k")):  # fmt: skip
            with pytest.raises(StorageUnavailable):
                call()
    assert time.monotonic() - started < 30, "an outage must fail fast (timeouts), not hang"
    store.probe()
    assert store.get_bytes("k") == b"v"


def test_a_bucket_slower_than_the_timeout_is_an_outage_not_a_hang(bucket: TestBucket, tmp_path: Path) -> None:
    store = attach(host(tmp_path, bucket, "a", object_store_timeout_s=0.5))
    assert store is not None
    store.put_bytes("k", b"v")
    blobs = BlobStore.for_settings(host(tmp_path, bucket, "b", object_store_timeout_s=0.5))
    sha = BlobStore.for_settings(host(tmp_path, bucket, "c")).put(b"image")
    started = time.monotonic()
    with bucket.slow(1.5):
        with pytest.raises(StorageUnavailable):
            store.get_bytes("k")
        with pytest.raises(StorageUnavailable):
            blobs.get(sha)  # what the worker's pipeline turns into a retry (BlobStoreUnavailable), never a rejection
    assert time.monotonic() - started < 30, "bounded by timeout x attempts"
    assert not blobs.path(sha).exists(), "no partial image in the cache"
    assert blobs.get(sha) == b"image"


def test_settings_refuse_a_bucket_url_with_credentials_without_echoing_them(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, object_store_url="s3://key:hunter2@bucket/p")
    assert "hunter2" not in str(caught.value) and "credentials" in str(caught.value)
    with pytest.raises(ValidationError, match="s3://bucket/prefix"):
        Settings(data_dir=tmp_path, object_store_url="http://bucket/p")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, object_store_url="s3://ab/")  # too short a bucket name
    assert Settings(data_dir=tmp_path, object_store_url="").object_store_url is None


def test_an_image_written_on_one_host_is_read_on_another(
    two_hosts: tuple[Settings, Settings], bucket: TestBucket
) -> None:
    a, b = two_hosts
    scraper, worker = BlobStore.for_settings(a), BlobStore.for_settings(b)
    writer = scraper.writer()
    writer.write(b"\xff\xd8\xff" + b"image" * 1000)
    sha = writer.commit()
    assert bucket.objects("blobs/") == [BlobStore.name(sha)]
    assert not worker.path(sha).exists()
    assert sha in worker
    assert worker.get(sha) == b"\xff\xd8\xff" + b"image" * 1000
    assert worker.path(sha).exists(), "the second read comes from the cache"
    with pytest.raises(FileNotFoundError):
        worker.get("0" * 64)


def test_a_commit_during_an_outage_raises_storage_unavailable_and_stores_nothing(
    two_hosts: tuple[Settings, Settings], bucket: TestBucket
) -> None:
    blobs = BlobStore.for_settings(two_hosts[0])
    writer = blobs.writer()
    writer.write(b"image")
    with bucket.away(), pytest.raises(StorageUnavailable):
        writer.commit()
    writer.abort()
    assert not bucket.objects("blobs/")
    assert not list(blobs.root.glob("??/??/*")), "no local copy of an image the bucket did not take"
    with bucket.away(), pytest.raises(StorageUnavailable):
        blobs.probe()
    assert blobs.put(b"image") and bucket.objects("blobs/")


def test_the_read_cache_stays_under_its_bound_oldest_out_first(tmp_path: Path, bucket: TestBucket) -> None:
    writer_host = host(tmp_path, bucket, "w")
    reader_host = host(tmp_path, bucket, "r", object_cache_bytes=50_000)
    shas = [BlobStore.for_settings(writer_host).put(bytes([i]) * 10_000) for i in range(12)]
    reader = BlobStore.for_settings(reader_host)
    for sha in shas:
        reader.get(sha)
        time.sleep(0.01)  # distinct mtimes
    cached = {p.name for p in reader.root.glob("??/??/*")}
    assert sum(p.stat().st_size for p in reader.root.glob("??/??/*")) <= 50_000
    assert shas[-1] in cached and shas[0] not in cached, "the least recently used go first"
    assert reader.get(shas[0]) == bytes([0]) * 10_000, "an evicted image is read from the bucket again"


def test_versions_published_on_one_host_are_followed_on_another(
    two_hosts: tuple[Settings, Settings], bucket: TestBucket
) -> None:
    a, b = two_hosts
    writer, reader = VersionedDir(a.hashtag_model_dir, ".npz"), VersionedDir(b.hashtag_model_dir, ".npz", poll_s=0)
    assert reader.current() is None and reader.stamp() is None
    for version in (1, 2, 3, 4):
        writer.root.mkdir(parents=True, exist_ok=True)
        writer.path(version).write_bytes(f"v{version}".encode())
        writer.path(version, ".json").write_bytes(b"{}")
        writer.publish(version)
        writer.prune(2, ".json")
        assert reader.current() == version and reader.stamp() == (version, 0)
        assert reader.fetch(version, ".json").read_bytes() == f"v{version}".encode()
        assert reader.path(version, ".json").exists()
    kept = sorted(p.name for p in reader.root.iterdir())
    assert kept == ["v000004.json", "v000004.npz"], "a reader keeps no old copy"
    assert VersionedDir(a.hashtag_model_dir, ".npz").next_version() == 5
    # a third host with an empty data dir numbers on from the bucket's versions, never over them
    assert reader.next_version() == 5
    left = sorted(bucket.objects("models/hashtags/"))
    assert left == [f"models/hashtags/{n}" for n in ("CURRENT", "v000003.json", "v000003.npz", "v000004.json",
                                                     "v000004.npz")]  # fmt: skip
    with bucket.away():
        time.sleep(0.01)
        assert reader.stamp() == (4, 0), "during an outage a reader keeps what it had"
        with pytest.raises(StorageUnavailable):
            reader.current()


def test_index_snapshots_written_on_the_writer_host_load_on_a_reader_host(
    two_hosts: tuple[Settings, Settings], bucket: TestBucket
) -> None:
    a, b = two_hosts
    index = VectorIndex.empty(8, "m")
    vectors = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    index.upsert(np.arange(20), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    SnapshotStore(a.index_dir).save(index)
    reader = LiveReader(SnapshotStore(b.index_dir), check_interval_s=0)
    reader.store.versions.poll_s = 0
    served = reader.get()
    assert served is not None and served.ntotal == 20
    index.upsert(np.array([99]), vectors[:1] / np.linalg.norm(vectors[:1]))
    SnapshotStore(a.index_dir).save(index)
    served = reader.get()
    assert served is not None and served.ntotal == 21 and 99 in served
    with bucket.away():
        assert reader.get() is served, "a reader serves what it has while the bucket is away"


def test_heads_and_hashtag_models_saved_on_one_host_are_loaded_on_another(
    two_hosts: tuple[Settings, Settings],
) -> None:
    a, b = two_hosts
    head = LinearHead("food", 1, ["a", "b"], np.eye(2, 4, dtype=np.float32), np.zeros(2, np.float32), "m", {})
    head.save(a.heads_dir)
    assert head_names(b.heads_dir) == ["food"], "a saved head is listed on every host"
    publish_head(b.heads_dir, "food", 1)  # published from the other host: the file is in the bucket
    heads = HeadSet(b.heads_dir, "m")
    assert list(heads.heads) == ["food"]
    model = HashtagModel(
        image_ids=np.array([1, 2], np.int64),
        image_factors=np.ones((2, 3), np.float32),
        hashtags=["a", "b"],
        hashtag_factors=np.ones((2, 3), np.float32),
        popularity=np.array([1, 1], np.int64),
    )
    model.save(a.hashtag_model_dir)
    assert HashtagModel.load(b.hashtag_model_dir).hashtags == ["a", "b"]
