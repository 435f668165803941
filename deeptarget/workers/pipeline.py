"""The infer stage's work on one batch: decode -> face filter -> embed -> heads.

Per-post failures are data (a rejected Prediction with its reason); only failures of the whole batch raise.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from deeptarget.blobs import BlobStore
from deeptarget.config import Settings
from deeptarget.errors import ImageRejected
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder
from deeptarget.models.faces import FaceFilter, FaceResult, build_face_detector
from deeptarget.models.heads import HeadSet
from deeptarget.schema import Post, PostRef, Prediction

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    post: Post
    blob: str | None
    prediction: Prediction
    embedding: np.ndarray | None


@dataclass(frozen=True)
class _Prepared:
    image: np.ndarray
    faces: FaceResult


class InferencePipeline:
    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs
        self.embedder = Embedder(
            backbone=settings.backbone,
            weights=settings.weights,
            normalization=settings.weights_normalization,
            image_size=settings.image_size,
            device=settings.device,
            micro_batch=settings.micro_batch,
        )
        detector = None
        if settings.face_policy != "off":
            detector = build_face_detector(settings.face_detector, settings.face_min_size, settings.face_model_path)
        self.face_filter = FaceFilter(
            detector, settings.face_policy, settings.face_min_confidence, settings.face_long_side
        )
        self.heads = HeadSet(settings.heads_dir, self.embedder.model_id)
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def _prepare(self, ref: PostRef) -> _Prepared | ImageRejected:
        """Decode and face-filter one post. The broad except is the per-item boundary: nothing escapes it."""
        try:
            if ref.rejected:
                return ImageRejected(ref.rejected, "rejected by the scraper")
            if not ref.blob:
                return ImageRejected("no_image")
            try:
                data = self.blobs.get(ref.blob)
            except (FileNotFoundError, ValueError) as err:
                return ImageRejected("blob_missing", str(err))
            image = decode_image(
                data, max_pixels=self.settings.max_image_pixels, long_side=self.settings.decode_long_side
            )
            faces, reason = self.face_filter(image)
            if reason:
                return ImageRejected(reason)
            return _Prepared(image, faces)
        except ImageRejected as err:
            return err
        except Exception as err:  # a poison image must not take the batch down
            LOG.exception("post %s: unexpected error while decoding", ref.post.id)
            return ImageRejected("processing_error", f"{type(err).__name__}: {err}")

    def __call__(self, refs: list[PostRef]) -> list[Result]:
        self.heads.refresh()  # a newly published head applies from this batch on
        prepared = list(self._pool.map(self._prepare, refs))
        accepted = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
        images = [prepared[i].image for i in accepted]  # type: ignore[union-attr]
        embeddings = self.embedder(images)
        classes = self.heads(embeddings)
        results: list[Result] = []
        by_index = dict(zip(accepted, range(len(accepted)), strict=True))
        for i, (ref, item) in enumerate(zip(refs, prepared, strict=True)):
            if isinstance(item, ImageRejected):
                LOG.info("post %s rejected: %s", ref.post.id, item)
                prediction = Prediction(post_id=ref.post.id, status="rejected", reason=item.reason)
                results.append(Result(ref.post, ref.blob, prediction, None))
                continue
            row = by_index[i]
            prediction = Prediction(
                post_id=ref.post.id,
                status="embedded",
                faces=item.faces.count,
                face_confidence=item.faces.best_confidence,
                face_boxes=[f.box for f in item.faces.faces],
                classes=classes[row],
                model_id=self.model_id,
            )
            results.append(Result(ref.post, ref.blob, prediction, embeddings[row]))
        return results
