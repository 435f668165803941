"""Explanations on the read side, shared by ``POST /explain`` and ``deeptarget explain``: an uploaded image, a head by
name and a class of it, or an indexed post to be similar to -> an ``Explanation`` (``models/explain.py``).

The image is decoded with the settings' limits (bytes, pixels, decode cost), as every upload is. A head is explained
with the embedder it was trained on: the configured one, or the model of the index being served when that is the
head's (``QueryService.query_embedder``); similarity with the model of the index, whose embedding of the post is the
target. Explainers (each with its own copy of the backbone) are kept for the last few heads asked for.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cached_property

from deeptarget.core.errors import ModelNotReadyError, NotFoundError
from deeptarget.core.records import vector_id
from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder
from deeptarget.models.explain import DEFAULT_METHOD, Explainer, Explanation
from deeptarget.models.heads import LinearHead, head_names, head_versions, published_file
from deeptarget.query.service import QueryService

KEPT_EXPLAINERS = 4


class ExplainService:
    def __init__(self, settings: Settings, service: QueryService | None = None, method: str = DEFAULT_METHOD) -> None:
        self.settings = settings
        self._service = service
        self.method = method
        self._explainers: OrderedDict[tuple[str, str, int, str], Explainer] = OrderedDict()
        self._lock = threading.Lock()

    @cached_property
    def service(self) -> QueryService:
        """The query service (the index, the store): made on first use when none was given (the CLI's class
        explanations need neither)."""
        return self._service or QueryService(self.settings)

    @cached_property
    def _configured(self) -> Embedder:
        return self._service.embedder if self._service is not None else Embedder.from_settings(self.settings)

    def head(self, name: str) -> LinearHead:
        """The published version of head ``name`` (the newest without a published one); NotFoundError if none."""
        path = published_file(head_versions(self.settings.heads_dir, name))  # InvalidName for a bad name
        if path is None:
            known = ", ".join(head_names(self.settings.heads_dir)[:20]) or "none yet: train one with train-head"
            raise NotFoundError(f"no head {name!r} (heads: {known})")
        return LinearHead.load(path)

    def explain(
        self,
        data: bytes,
        head: str | None = None,
        class_name: str | None = None,
        similar: str | None = None,
        method: str | None = None,
    ) -> Explanation:
        """Explain ``class_name`` of ``head`` (default: its most probable class) in the image ``data``, or (with
        ``similar``, a post id) which regions make it similar to that indexed post, with ``method`` (default: the
        service's). Raises ImageRejected for an unusable image, NotFoundError for an unknown head, class or post,
        ModelNotReadyError when the model the head or the index needs is not the one served."""
        s = self.settings
        method = method or self.method
        linear = self.head(head) if head is not None else None  # before decoding: a bad name costs no decode
        image = decode_image(
            data, max_pixels=s.max_image_pixels, long_side=s.decode_long_side, max_decode_bytes=s.max_decode_bytes
        )
        if similar is not None:
            index = self.service.index()
            other = index.reconstruct(vector_id(similar))
            if other is None:
                raise NotFoundError(f"post {similar} is not in the index")
            embedder = self.service.query_embedder(index)
            if embedder.model_id != index.model_id:
                raise ModelNotReadyError(f"the index holds {index.model_id} embeddings; this process embeds with "
                                         f"{embedder.model_id}")  # fmt: skip
            same_model = linear if linear and linear.model_id == embedder.model_id else None
            return self.explainer(embedder, same_model, method).explain_similarity(image, other, similar)
        if linear is None:
            raise NotFoundError("explaining a class needs a head (or a post to be similar to)")
        return self.explainer(self.embedder_for(linear), linear, method).explain(image, class_name)

    def embedder_for(self, head: LinearHead) -> Embedder:
        """The embedder ``head`` was trained on: the configured one, or the model of the index being served."""
        if self._configured.model_id == head.model_id:
            return self._configured
        index = self.service.snapshots.get() if self._service is not None else None
        if index is not None and index.model_id == head.model_id:
            return self.service.query_embedder(index)
        raise ModelNotReadyError(
            f"head {head.name} v{head.version} was trained on {head.model_id}, but this process embeds with "
            f"{self._configured.model_id}: configure that model, or train the head again on this one"
        )

    def explainer(self, embedder: Embedder, head: LinearHead | None, method: str | None = None) -> Explainer:
        method = method or self.method
        key = (embedder.model_id, head.name if head else "", head.version if head else 0, method)
        with self._lock:
            if key in self._explainers:
                self._explainers.move_to_end(key)
                return self._explainers[key]
            explainer = Explainer(embedder, head, method)
            self._explainers[key] = explainer
            while len(self._explainers) > KEPT_EXPLAINERS:
                self._explainers.popitem(last=False)
            return explainer
