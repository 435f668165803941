"""Switching the workers to other weights: ``reembed`` has every stored post embedded again from its stored image,
and the rebuilt index then holds the new model's vectors only, each post once. Image queries are answered throughout,
with the model of the index being served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget import jobs
from deeptarget.core.errors import IndexMismatchError
from deeptarget.index.vectors import SnapshotStore
from deeptarget.jobs import Jobs
from deeptarget.models.embedder import Embedder
from deeptarget.ops.reembed import rebuild_index, send_reembed, wait_until_reembedded
from deeptarget.query.service import QueryService
from deeptarget.runtime.processes import stop_processes
from deeptarget.store.metadata import MetadataStore
from tests.conftest import WorkerFactory, make_settings, snapshot_size, wait_for
from tests.helpers import calibrated_random_weights, make_dataset, send_photo_batch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_reembed_moves_every_post_and_the_index_to_the_new_weights(
    tmp_path: Path, redis_url: str, start_worker: WorkerFactory
) -> None:
    make_dataset(tmp_path / "photos")
    old = make_settings(tmp_path / "data", redis_url)
    store = MetadataStore(old.metadata_database)
    workers = [
        start_worker(old, [jobs.index_queue], "index-old", pool="solo"),
        start_worker(old, [jobs.infer_queue, jobs.profiles_queue], "infer-old"),
    ]
    post_ids = send_photo_batch(old, tmp_path / "photos", "p")
    wait_for(lambda: store.status_counts() == {"indexed": len(post_ids)}, "every post indexed", 120)
    Jobs.for_settings(old).snapshot()
    wait_for(lambda: snapshot_size(old.index_dir) == len(post_ids), "a snapshot")
    old_model = SnapshotStore(old.index_dir).load().model_id
    before = store.embeddings(post_ids).vectors.copy()
    stop_processes(workers)

    new = old.model_copy(update={"weights": str(calibrated_random_weights(tmp_path / "tuned.pth"))})
    new_model = Embedder.from_settings(new).model_id
    assert new_model != old_model
    start_worker(new, [jobs.index_queue], "index-new", pool="solo")
    start_worker(new, [jobs.infer_queue, jobs.profiles_queue], "infer-new")
    app = Jobs.for_settings(new)
    # An API already on the new weights answers image queries with the old model until the index is rebuilt.
    photo = sorted((tmp_path / "photos").glob("*/0.jpg"))[0].read_bytes()
    api_old, api_new = QueryService(old), QueryService(new)
    assert api_new.query_embedder(api_new.index()).model_id == old_model
    assert neighbours(api_new, photo) == neighbours(api_old, photo)
    assert send_reembed(store, app, new_model, batch_size=4) == len(post_ids)
    assert wait_until_reembedded(store, new_model, timeout_s=120, poll_s=0.2) == 0
    rebuild_index(app)

    def rebuilt() -> bool:
        index = SnapshotStore(new.index_dir).load()
        return index is not None and index.model_id == new_model and index.ntotal == len(post_ids)

    wait_for(rebuilt, "an index of the new model with every post once", 120)
    assert store.model_ids() == {new_model: len(post_ids)}
    wait_for(lambda: store.status_counts() == {"indexed": len(post_ids)}, "every post indexed again", 120)
    after = store.embeddings(post_ids).vectors
    assert not np.allclose(after, before, atol=1e-3)  # new vectors, same posts
    assert send_reembed(store, app, new_model, batch_size=4) == 0  # nothing left to do

    # The rebuilt index is served by either API: an old one follows it to the new model, which the workers recorded.
    wait_for(lambda: api_old.index().model_id == new_model, "the API to load the rebuilt index")
    assert api_old.query_embedder(api_old.index()).model_id == new_model
    assert neighbours(api_old, photo) == neighbours(api_new, photo)
    # Weights that changed under the recorded path cannot stand in: the mismatch is reported, not hidden.
    calibrated_random_weights(Path(new.weights), seed=1)
    with pytest.raises(IndexMismatchError):
        QueryService(old).similar_to_image(photo)


def neighbours(service: QueryService, photo: bytes) -> list[tuple[str, float]]:
    return [(n.post_id, round(n.score, 4)) for n in service.similar_to_image(photo, k=5)]
