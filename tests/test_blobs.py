from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from deeptarget.store.blobs import BlobStore


def test_blobs_are_content_addressed_and_stored_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put(b"image bytes")
    assert sha == hashlib.sha256(b"image bytes").hexdigest()
    assert store.get(sha) == b"image bytes"
    assert store.put(b"image bytes") == sha
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [store.path(sha)]


def test_streamed_writer_leaves_nothing_when_aborted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    writer = store.writer()
    writer.write(b"half of an ima")
    writer.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_streamed_writer_commits_under_the_hash_of_all_chunks(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    writer = store.writer()
    for chunk in (b"a" * 1000, b"b" * 1000):
        writer.write(chunk)
    sha = writer.commit()
    assert sha == hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest()
    assert sha in store


def test_only_hex_digests_are_paths(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ValueError):
        store.path("../../etc/passwd" + "0" * 48)
    with pytest.raises(ValueError):
        store.path("abc")
