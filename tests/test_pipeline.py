"""The infer pipeline on its own: micro-batches overlapped with decoding, per-item rejections, OOM splitting and
task-level failures of the blob store."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from deeptarget.core.errors import BlobStoreUnavailable, ResourceExhausted
from deeptarget.core.records import Post, PostRef
from deeptarget.sandbox import SandboxNetwork
from deeptarget.store.blobs import BlobStore
from deeptarget.workers.pipeline import OOM_SPLITS, InferencePipeline, split_on_oom
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def network() -> SandboxNetwork:
    return SandboxNetwork(seed=5, n_posts=40, corrupt_share=0.0)


def make_pipeline(tmp_path: Path, **overrides: object) -> InferencePipeline:
    settings = make_settings(tmp_path / "data", **({"face_policy": "off", "micro_batch": 4} | overrides))
    return InferencePipeline(settings, BlobStore(settings.blob_dir))


def refs_for(pipeline: InferencePipeline, network: SandboxNetwork, n: int) -> list[PostRef]:
    return [PostRef(post=Post(id=m.id), blob=pipeline.blobs.put(m.image_bytes())) for m in network.media[:n]]


def test_results_keep_the_batch_order_with_rejections_between_micro_batches(
    tmp_path: Path, network: SandboxNetwork
) -> None:
    pipeline = make_pipeline(tmp_path)
    refs = refs_for(pipeline, network, 11)
    refs[2] = PostRef(post=Post(id="garbage"), blob=pipeline.blobs.put(b"\xff\xd8\xff" + b"\x00" * 300))
    refs[7] = PostRef(post=Post(id="gone"), blob="0" * 64)
    refs[9] = PostRef(post=Post(id="scraper-said-no"), rejected="too_large")
    results = pipeline(refs)
    assert [r.post.id for r in results] == [r.post.id for r in refs]
    reasons = {r.post.id: r.prediction.reason for r in results if r.prediction.status == "rejected"}
    assert reasons == {"garbage": "not_an_image", "gone": "blob_missing", "scraper-said-no": "too_large"}
    embedded = [r for r in results if r.embedding is not None]
    assert len(embedded) == 8
    # the same image embeds to the same vector whichever micro-batch it landed in
    alone = pipeline([refs[10]])[0].embedding
    assert alone is not None and embedded[-1].embedding is not None
    np.testing.assert_allclose(alone, embedded[-1].embedding, atol=1e-5)


def test_out_of_memory_splits_the_batch_and_loses_nothing(tmp_path: Path, network: SandboxNetwork) -> None:
    pipeline = make_pipeline(tmp_path, micro_batch=8)
    refs = refs_for(pipeline, network, 8)
    expected = np.stack([r.embedding for r in pipeline(refs)])  # type: ignore[misc]

    embed = pipeline.embedder.embed_tensors
    sizes: list[int] = []

    def small_gpu(batch: torch.Tensor) -> np.ndarray:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return embed(batch)

    pipeline.embedder.embed_tensors = small_gpu  # type: ignore[method-assign]
    splits_before = OOM_SPLITS._value.get()
    results = pipeline(refs)
    assert all(r.prediction.status == "embedded" for r in results)
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), expected, atol=1e-5)  # type: ignore[misc]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert OOM_SPLITS._value.get() - splits_before == 3


def test_out_of_memory_for_one_image_fails_the_task_for_a_retry() -> None:
    def always_oom(items: Sequence[int]) -> list[int]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ResourceExhausted, match="single image"):
        split_on_oom(always_oom, [1, 2, 3], "embedding")


def test_an_unreadable_blob_store_fails_the_task_instead_of_rejecting_posts(
    tmp_path: Path, network: SandboxNetwork
) -> None:
    pipeline = make_pipeline(tmp_path)
    refs = refs_for(pipeline, network, 3)
    shard = pipeline.blobs.path(refs[1].blob or "").parent.parent
    shutil.rmtree(shard)
    shard.write_text("a volume that went away")  # reading under it now fails with NotADirectoryError, not ENOENT
    with pytest.raises(BlobStoreUnavailable, match="unreadable"):
        pipeline(refs)


def test_the_device_decoder_path_agrees_with_the_pil_path(tmp_path: Path, network: SandboxNetwork) -> None:
    pil = make_pipeline(tmp_path / "pil", face_policy="tag", face_detector="haar")
    device = make_pipeline(tmp_path / "device", face_policy="tag", face_detector="haar", jpeg_decoder="torchvision")
    assert device.device_decode and not pil.device_decode
    refs = refs_for(pil, network, 12)
    refs_for(device, network, 12)
    broken = network.media[0].image_bytes()[:2000]
    for pipeline in (pil, device):
        pipeline.blobs.put(broken)
    refs.append(PostRef(post=Post(id="truncated"), blob=pil.blobs.put(broken)))
    by_pil, by_device = pil(refs), device(refs)
    assert by_device[-1].prediction.status == "rejected"
    assert by_device[-1].prediction.reason in ("truncated_image", "corrupt_image")
    for a, b in zip(by_pil[:-1], by_device[:-1], strict=True):
        assert a.embedding is not None and b.embedding is not None
        assert float(a.embedding @ b.embedding) > 0.98  # different resamplers, the same picture
        assert a.prediction.faces == b.prediction.faces
    assert any(r.prediction.faces for r in by_device), "the sample should hold a face for this test to mean much"
