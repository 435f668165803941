"""A head published while a real worker runs classifies the worker's next batch; reclassify brings the posts
classified before up to date from their stored embeddings, never touching the embeddings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deeptarget import jobs
from deeptarget.models.heads import LinearHead, head_versions
from deeptarget.ops.reclassify import published_heads, reclassify
from deeptarget.store.metadata import MetadataStore
from deeptarget.training.train_head import train_head
from tests.conftest import WorkerFactory, make_settings, wait_for
from tests.helpers import make_dataset, send_photo_batch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _wait_classified(store: MetadataStore, post_ids: list[str]) -> None:
    def done() -> bool:
        return all((p := store.post(i)) is not None and p.status in ("embedded", "indexed") for i in post_ids)

    wait_for(done, f"{len(post_ids)} posts embedded", timeout_s=120)


def test_published_head_reaches_the_next_batch_and_reclassify_the_earlier_ones(
    tmp_path: Path, redis_url: str, start_worker: WorkerFactory
) -> None:
    make_dataset(tmp_path / "photos")
    settings = make_settings(tmp_path / "data", redis_url)
    store = MetadataStore(settings.metadata_database)
    first = train_head(settings, tmp_path / "photos", "colour", publish=True, report=False)
    start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "heads")

    early = send_photo_batch(settings, tmp_path / "photos", "early")
    _wait_classified(store, early)
    assert all(set(store.post(p).classes["colour"]) == {"grass", "sky", "tomatoes"} for p in early)
    embeddings_before = store.embeddings(early).vectors.copy()

    # The same photos under new class names: a visibly different head, published while the worker runs.
    renamed = tmp_path / "renamed"
    for old, new in (("grass", "lawn"), ("sky", "ocean"), ("tomatoes", "paprika")):
        shutil.copytree(tmp_path / "photos" / old, renamed / new)
    second = train_head(settings, renamed, "colour", publish=True, report=False)
    assert second.head.version == first.head.version + 1

    late = send_photo_batch(settings, tmp_path / "photos", "late")
    _wait_classified(store, late)
    for post_id in late:
        classes = store.post(post_id).classes["colour"]
        assert set(classes) == {"lawn", "ocean", "paprika"}  # the worker was not restarted
        # and what v2 says of that post's stored embedding
        expected = second.head(store.embeddings([post_id]).vectors)[0]
        np.testing.assert_allclose([classes[c] for c in second.head.classes], expected, atol=1e-5)
    assert all(set(store.post(p).classes["colour"]) == {"grass", "sky", "tomatoes"} for p in early)

    done = reclassify(store, published_heads(settings.heads_dir), half_life_days=30.0, outlier_k=3.0)
    assert done.heads == {"colour": 2} and done.posts["colour"] == len(early) + len(late)
    assert done.profiles == 3
    for post_id in early:
        post = store.post(post_id)
        assert set(post.classes["colour"]) == {"lawn", "ocean", "paprika"}
        assert max(post.classes["colour"], key=post.classes["colour"].get) == {
            "grass": "lawn", "sky": "ocean", "tomatoes": "paprika"
        }[post_id.split("-")[1]]  # fmt: skip
    np.testing.assert_array_equal(store.embeddings(early).vectors, embeddings_before)
    profile = store.profile("owner-sky")
    assert profile is not None and set(profile.classes["colour"]) == {"lawn", "ocean", "paprika"}
    assert LinearHead.load(head_versions(settings.heads_dir, "colour").path(1)).classes == ["grass", "sky", "tomatoes"]
