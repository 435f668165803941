"""IVF: the index kind for large collections, built in the background, tuned to a recall target, losing nothing."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from deeptarget.core.records import Post, Prediction, vector_id
from deeptarget.index.builder import CODECS, IndexPolicy, build_ivf, recall_at_k, reranked
from deeptarget.index.deltas import Change, Entry
from deeptarget.index.segments import LiveIndex
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import PER_VECTOR_BYTES, SnapshotStore, VectorIndex
from deeptarget.index.writer import IndexWriter
from deeptarget.query.service import QueryService
from deeptarget.store.metadata import MetadataStore
from tests.conftest import make_settings

MODEL = "mobilenet_v2:random0:imagenet:96"
DIM = 32
DATA = ClusteredVectors(dim=DIM, n_clusters=60, seed=3, rank=16)


def test_ivf_replaces_removes_reconstructs_and_survives_a_snapshot(tmp_path: Path) -> None:
    vectors = DATA.sample(4000)
    ids = np.arange(10, 4010, dtype=np.int64)
    index = VectorIndex.trained_ivf(DIM, MODEL, vectors[:2000], nlist=32)
    index.upsert(ids, vectors)
    index.upsert(ids[:100], vectors[100:200])  # replaced, not duplicated
    assert index.ntotal == 4000 and index.kind == "ivf"
    np.testing.assert_allclose(index.reconstruct(int(ids[5])), vectors[105])
    assert index.remove(np.array([ids[0], ids[1], 999_999])) == 2
    assert index.ntotal == 3998 and int(ids[0]) not in index
    index.nprobe = 8

    SnapshotStore(tmp_path).save(index)
    loaded = SnapshotStore(tmp_path).load()
    assert loaded is not None and loaded.kind == "ivf" and loaded.nprobe == 8 and loaded.ntotal == 3998
    np.testing.assert_allclose(loaded.reconstruct(int(ids[5])), vectors[105])
    loaded.upsert(ids[5:6], vectors[:1])  # the direct map came back with it: ids can still be replaced
    assert loaded.ntotal == 3998


def test_nprobe_is_tuned_to_the_recall_target_and_holds_for_new_queries() -> None:
    vectors = DATA.sample(20_000)
    ids = np.arange(len(vectors), dtype=np.int64)
    rng = np.random.default_rng(0)
    sample_rows = rng.permutation(len(vectors))[:2560]
    policy = IndexPolicy(target_recall=0.95, tuning_queries=200)
    chunks = lambda: ((ids[i : i + 5000], vectors[i : i + 5000]) for i in range(0, len(ids), 5000))  # noqa: E731
    index, tuning = build_ivf(DIM, MODEL, vectors[sample_rows], ids[sample_rows], chunks, len(ids), policy)
    assert index.ntotal == 20_000 and index.nlist == 64
    assert tuning.recall >= 0.95 and tuning.nprobe < index.nlist, tuning.curve  # approximate, and good enough
    assert list(tuning.curve) == [2**i for i in range(len(tuning.curve))]

    queries = DATA.sample(300, stream=1)  # not in the collection
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact, np.full(len(queries), -2), 10) >= 0.92


def _record(store: MetadataStore, vectors: np.ndarray, start: int) -> list[str]:
    ids = [f"p{start + i}" for i in range(len(vectors))]
    store.record_results(
        (Post(id=pid), None, Prediction(post_id=pid, status="embedded", model_id=MODEL), v)
        for pid, v in zip(ids, vectors, strict=True)
    )
    return ids


@pytest.mark.timeout(120)
def test_the_writer_grows_into_ivf_in_the_background_and_loses_nothing(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "meta.sqlite3")
    vectors = DATA.sample(6000)
    _record(store, vectors[:3000], 0)
    snapshots = SnapshotStore(tmp_path / "index")
    policy = IndexPolicy(ivf_from=2000, tuning_queries=100)
    writer = IndexWriter(store, snapshots, snapshot_every_adds=500, policy=policy)  # replays 3000: flat, then a build
    assert writer.build is not None
    for start in range(3000, 6000, 250):  # adds go on while the IVF index is trained and filled
        writer.add(store.embeddings(_record(store, vectors[start : start + 250], start)))
    tuning = writer.wait_for_build(60)
    assert tuning is not None and tuning.recall >= 0.95
    assert writer.index is not None and writer.index.kind == "ivf"
    assert writer.index.ntotal == 6000
    post_ids = [f"p{i}" for i in range(6000)]
    assert all(vector_id(p) in writer.index for p in post_ids[::37])
    writer.add(store.embeddings(post_ids[:500]))  # re-adding replaces
    assert writer.index.ntotal == 6000
    writer.snapshot()

    published = snapshots.load()
    assert published is not None and published.kind == "ivf" and published.nprobe == tuning.nprobe
    assert published.ntotal == 6000
    restarted = IndexWriter(store, snapshots, policy=policy)  # loads the IVF snapshot; nothing to replay or rebuild
    assert restarted.index is not None and restarted.index.kind == "ivf" and restarted.build is None
    assert store.status_counts() == {"indexed": 6000}


def test_a_collection_past_the_memory_budget_gets_a_scalar_quantized_ivf_that_readers_map_and_follow(
    tmp_path: Path,
) -> None:
    """The codec is the finest that fits ``memory_budget``; a quantized base is mapped, and a reader's delta
    (float, on the base's quantizer) and tombstones work over it as over a float one."""
    vectors = DATA.sample(8000)
    ids = np.arange(len(vectors), dtype=np.int64)
    per_vector = PER_VECTOR_BYTES
    fits = {codec: len(ids) * (DIM * share + per_vector) for codec, share in CODECS.items()}
    assert IndexPolicy(memory_budget=int(fits["Flat"])).codec_for(len(ids), DIM) == "Flat"
    assert IndexPolicy(memory_budget=int(fits["SQ8"])).codec_for(len(ids), DIM) == "SQ8"
    policy = IndexPolicy(memory_budget=int(fits["SQ6"]), tuning_queries=200)
    chunks = lambda: ((ids[i : i + 4000], vectors[i : i + 4000]) for i in range(0, len(ids), 4000))  # noqa: E731
    index, tuning = build_ivf(DIM, MODEL, vectors[:2560], ids[:2560], chunks, len(ids), policy)
    assert index.codec == "SQ6" and tuning.recall >= 0.9, tuning.curve
    grown = IndexPolicy(memory_budget=int(fits["SQ8"]) // 2)  # the collection outgrew its codec: rebuild smaller
    assert grown.wants_rebuild(index) and not policy.wants_rebuild(index)

    store = SnapshotStore(tmp_path)
    store.save(index)
    base = store.load(mapped=True)
    assert base is not None and base.codec == "SQ6" and base.read_only
    live = LiveIndex.of(base)
    fresh = DATA.sample(10, stream=5)
    changes = [Change("add", np.array([3, 99_999]), fresh[:2]), Change("remove", np.array([5]))]
    live.apply([Entry(f"1-{i}", "", change) for i, change in enumerate(changes)])
    assert live.ntotal == len(ids) and 5 not in live
    np.testing.assert_array_equal(live.reconstruct(3), fresh[0])  # the delta holds floats
    scores, found = live.search(fresh[:2], 5)
    assert list(found[:, 0]) == [3, 99_999] and np.allclose(scores[:, 0], 1, atol=1e-5)
    assert all(len(set(row.tolist())) == 5 for row in found)


def test_answers_from_a_quantized_base_are_rescored_exactly_from_the_stored_embeddings(tmp_path: Path) -> None:
    """SQ4 alone misses a share of the exact top 10; the query service re-scores 4x the candidates from the
    metadata store's float embeddings and gets nearly all of them."""
    vectors = DATA.sample(6000)
    settings = make_settings(tmp_path / "data", index_ivf_from=1000, index_memory_budget=6000 * 16 + 6000 * 48)
    store = MetadataStore(settings.metadata_database)
    post_ids = _record(store, vectors, 0)
    writer = IndexWriter.from_settings(settings, store)  # replays the 6000 rows: flat, then an IVF for the budget
    writer.wait_for_build()
    assert writer.index is not None and writer.index.codec == "SQ4"
    writer.snapshot()
    service = QueryService(settings, store)
    queries = DATA.sample(100, stream=9)
    vids = np.array([vector_id(p) for p in post_ids])
    exact = vids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    raw = service.index().search(queries, 10)[1]
    rescored = np.array([[vector_id(n.post_id) for n in service.similar_to_vector(q, 10)] for q in queries])
    raw_recall = recall_at_k(raw, exact, np.full(100, -1), 10)
    rescored_recall = recall_at_k(rescored, exact, np.full(100, -1), 10)
    assert rescored_recall >= 0.95 and rescored_recall > raw_recall, (raw_recall, rescored_recall)
    writer.close()


def test_a_quantized_base_is_tuned_for_its_rescored_candidates_not_for_its_own_ranking(tmp_path: Path) -> None:
    """SQ4's own top 10 stays short of the target at any nprobe, so tuning its ranking would end at nprobe = nlist
    (every list scanned); what queries get is 4x the candidates re-scored exactly, and that reaches the target."""
    vectors = DATA.sample(8000)
    ids = np.arange(len(vectors), dtype=np.int64)
    policy = IndexPolicy(memory_budget=len(ids) * (DIM // 2 + 48), tuning_queries=200)
    chunks = lambda: ((ids[i : i + 4000], vectors[i : i + 4000]) for i in range(0, len(ids), 4000))  # noqa: E731
    index, tuning = build_ivf(DIM, MODEL, vectors[:2560], ids[:2560], chunks, len(ids), policy)
    assert index.codec == "SQ4" and reranked(index.codec) and index.rerank == tuning.rerank > 1
    assert tuning.recall >= policy.target_recall and tuning.nprobe < index.nlist, tuning.curve
    store = SnapshotStore(tmp_path)
    store.save(index)
    loaded = store.load(mapped=True)
    assert loaded is not None and (loaded.nprobe, loaded.rerank) == (tuning.nprobe, tuning.rerank)  # readers serve it
    exact = ids[np.argsort(-(vectors[:200] @ vectors.T), axis=1)[:, :11]]
    index.nprobe = index.nlist
    own_ranking = recall_at_k(index.search(vectors[:200], 11)[1], exact, ids[:200], 10)
    assert own_ranking < policy.target_recall < tuning.recall, (own_ranking, tuning.curve)
