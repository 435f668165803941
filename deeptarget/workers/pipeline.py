"""The infer stage's work on one batch: decode -> face filter -> embed -> heads.

Decoding (and, for per-image detectors, face detection and resizing) runs on a thread pool while the calling thread
runs the models one micro-batch at a time, so the next micro-batch is being decoded while the current one is in the
model. With the torchvision decoder (the default on CUDA), the threads only read and probe JPEGs; the model thread
decodes each micro-batch straight into GPU memory with nvJPEG and resizes it there.

Per-post failures are data (a rejected Prediction with its reason); only failures of the whole batch raise: a
blob store that cannot be read, or out of memory even for one image (both ``TransientError``: the task retries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
from prometheus_client import Counter

from deeptarget.core.errors import BlobStoreUnavailable, ImageRejected, ResourceExhausted
from deeptarget.core.records import InferResult, PostRef, PostStatus, Prediction
from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image, decode_jpegs, probe_jpeg
from deeptarget.models.embedder import Embedder
from deeptarget.models.faces import FaceFilter, FaceResult, build_face_detector
from deeptarget.models.files import face_model_file
from deeptarget.models.heads import HeadSet
from deeptarget.store.blobs import BlobStore

LOG = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

OOM_SPLITS = Counter("deeptarget_worker_oom_splits_total", "Model batches split in two after running out of memory")


@dataclass(frozen=True)
class _Prepared:
    pixels: np.ndarray | torch.Tensor  # the model's input: (size, size, 3) uint8 array or (3, size, size) tensor
    faces: FaceResult | None  # None until a batched detector has run
    image: np.ndarray | None = None  # the decoded image, kept only for a batched face detector


@dataclass(frozen=True)
class _Encoded:
    data: bytes  # a JPEG within the limits, for the device decoder


Outcome = _Prepared | _Encoded | ImageRejected


def _kept_image(outcome: Outcome) -> np.ndarray:
    """The decoded image kept for a batched detector (``_faces`` keeps it, the device decoder copies it to the host:
    the detector batches only under a face policy)."""
    assert isinstance(outcome, _Prepared) and outcome.image is not None
    return outcome.image


def split_on_oom(run: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T], what: str) -> list[R]:
    """``run(items)``; when it runs out of memory, free the cache and run each half, down to single items.

    Out of memory for a single item is a ``ResourceExhausted`` for the whole task (retried later), never a rejection:
    the image is not at fault.
    """
    try:
        return list(run(items))
    except torch.OutOfMemoryError as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) <= 1:
            raise ResourceExhausted(f"{what}: out of memory for a single image: {err}") from err
        OOM_SPLITS.inc()
        half = len(items) // 2
        LOG.warning("%s: out of memory on %d images, splitting into %d + %d", what, len(items), half, len(items) - half)
        return split_on_oom(run, items[:half], what) + split_on_oom(run, items[half:], what)


class InferencePipeline:
    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs
        self.embedder = Embedder.from_settings(settings)
        detector = None
        if settings.face_policy != "off":
            detector = build_face_detector(
                settings.face_detector, settings.face_min_size, face_model_file(settings), str(self.embedder.device)
            )
        self.face_filter = FaceFilter(
            detector, settings.face_policy, settings.face_min_confidence, settings.face_long_side
        )
        self.heads = HeadSet(settings.heads_dir, self.embedder.model_id)
        self.micro_batch = self.embedder.micro_batch
        decoder = settings.jpeg_decoder
        self.device_decode = decoder == "torchvision" or (decoder == "auto" and self.embedder.device.type == "cuda")
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def _read(self, blob: str) -> bytes:
        try:
            return self.blobs.get(blob)
        except (FileNotFoundError, ValueError) as err:
            raise ImageRejected("blob_missing", str(err)) from err
        except OSError as err:  # the store itself is unwell: retry the task, do not reject the post
            raise BlobStoreUnavailable(f"blob store {self.blobs.root} unreadable: {err}") from err

    def _prepare(self, ref: PostRef) -> Outcome:
        """Decode, face-filter (per-image detectors) and resize one post. Runs on a decode thread.

        The broad except is the per-item boundary: nothing but a store failure escapes it.
        """
        try:
            if ref.rejected:
                return ImageRejected(ref.rejected, "rejected by the scraper")
            if not ref.blob:
                return ImageRejected("no_image")
            s = self.settings
            data = self._read(ref.blob)
            if self.device_decode and probe_jpeg(
                data, max_pixels=s.max_image_pixels, max_decode_bytes=s.max_decode_bytes
            ):
                return _Encoded(data)
            image = decode_image(
                data, max_pixels=s.max_image_pixels, long_side=s.decode_long_side, max_decode_bytes=s.max_decode_bytes
            )
            return self._faces(self.embedder.preprocess(image), image)
        except ImageRejected as err:
            return err
        except BlobStoreUnavailable:
            raise
        except Exception as err:  # a poison image must not take the batch down
            LOG.exception("post %s: unexpected error while decoding", ref.post.id)
            return ImageRejected("processing_error", f"{type(err).__name__}: {err}")

    def _faces(self, pixels: np.ndarray | torch.Tensor, image: np.ndarray | None) -> _Prepared | ImageRejected:
        """Per-image face detection now, or the decoded image kept for a batched detector."""
        if self.face_filter.batched:
            return _Prepared(pixels, None, image)
        if image is None:
            return _Prepared(pixels, FaceResult())
        faces, reason = self.face_filter(image)
        return ImageRejected(reason) if reason else _Prepared(pixels, faces)

    def _decode_on_device(self, indices: list[int], outcomes: list[Outcome]) -> None:
        encoded = {i: outcome.data for i in indices if isinstance(outcome := outcomes[i], _Encoded)}
        if not encoded:
            return
        device, long_side = self.embedder.device, self.settings.decode_long_side
        datas = list(encoded.values())
        images = split_on_oom(lambda chunk: decode_jpegs(list(chunk), device, long_side=long_side), datas, "decode")
        faces_wanted = self.face_filter.policy != "off"
        for i, image in zip(encoded, images, strict=True):
            if isinstance(image, ImageRejected):
                outcomes[i] = image
                continue
            host = image.permute(1, 2, 0).cpu().numpy() if faces_wanted else None  # detectors take host arrays
            outcomes[i] = self._faces(self.embedder.preprocess_tensor(image), host)

    def _run_models(self, indices: list[int], outcomes: list[Outcome], embeddings: dict[int, np.ndarray]) -> None:
        """Device decoding, batched face detection (when the detector batches) and the embedding for a micro-batch."""
        self._decode_on_device(indices, outcomes)
        indices = [i for i in indices if isinstance(outcomes[i], _Prepared)]
        if self.face_filter.batched and indices:
            images = [_kept_image(outcomes[i]) for i in indices]
            found = split_on_oom(self.face_filter.filter_batch, images, "face detection")
            for i, (faces, reason) in zip(indices, found, strict=True):
                prepared = outcomes[i]
                assert isinstance(prepared, _Prepared)
                outcomes[i] = ImageRejected(reason) if reason else replace(prepared, faces=faces, image=None)
            indices = [i for i in indices if isinstance(outcomes[i], _Prepared)]
        if not indices:
            return
        pixels = [_chw(outcome.pixels) for i in indices if isinstance(outcome := outcomes[i], _Prepared)]
        rows: list[np.ndarray] = split_on_oom(
            lambda chunk: list(self.embedder.embed_tensors(torch.stack(list(chunk)))), pixels, "embedding"
        )
        embeddings.update(zip(indices, rows, strict=True))

    def __call__(self, refs: list[PostRef]) -> list[InferResult]:
        self.heads.refresh()  # a newly published head applies from this batch on
        futures: list[Future[Outcome]] = [self._pool.submit(self._prepare, ref) for ref in refs]
        outcomes: list[Outcome] = []
        embeddings: dict[int, np.ndarray] = {}
        waiting: list[int] = []
        try:
            for i, future in enumerate(futures):
                outcomes.append(future.result())
                if not isinstance(outcomes[i], ImageRejected):
                    waiting.append(i)
                if len(waiting) >= self.micro_batch:
                    self._run_models(waiting, outcomes, embeddings)
                    waiting = []
            self._run_models(waiting, outcomes, embeddings)
        finally:
            for future in futures:
                future.cancel()  # after a store failure: do not decode the rest for nothing
        order = sorted(embeddings)
        classes = self.heads(np.stack([embeddings[i] for i in order])) if order else []
        classes_of = dict(zip(order, classes, strict=True))
        return [self._result(ref, outcomes[i], embeddings.get(i), classes_of.get(i)) for i, ref in enumerate(refs)]

    def _result(
        self, ref: PostRef, outcome: Outcome, embedding: np.ndarray | None, classes: dict[str, dict[str, float]] | None
    ) -> InferResult:
        if isinstance(outcome, ImageRejected):
            LOG.info("post %s rejected: %s", ref.post.id, outcome)
            prediction = Prediction(post_id=ref.post.id, status=PostStatus.REJECTED, reason=outcome.reason)
            return InferResult(ref.post, ref.blob, prediction, None)
        assert isinstance(outcome, _Prepared) and embedding is not None and outcome.faces is not None
        prediction = Prediction(
            post_id=ref.post.id,
            status=PostStatus.EMBEDDED,
            faces=outcome.faces.count,
            face_confidence=outcome.faces.best_confidence,
            face_boxes=[f.box for f in outcome.faces.faces],
            classes=classes or {},
            model_id=self.model_id,
        )
        return InferResult(ref.post, ref.blob, prediction, embedding)


def _chw(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    return pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels).permute(2, 0, 1)
