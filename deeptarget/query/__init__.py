"""Read-only questions over an indexed deployment: similar images, hashtags for an image, profiles, audiences.

``QueryService(settings)`` answers them from the newest snapshot, the hashtag model and the metadata store, with
neither Redis nor Celery; ``PostFilter`` narrows neighbours, which come back as ``Neighbour``; ``ExplainService``
explains an image's class or its similarity to an indexed post. Names are imported on first use
(``deeptarget.core.lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeptarget.core.lazy import lazy_exports

if TYPE_CHECKING:
    from deeptarget.query.explain import ExplainService
    from deeptarget.query.service import NO_FILTER, Neighbour, PostFilter, QueryService

__all__ = ["NO_FILTER", "ExplainService", "Neighbour", "PostFilter", "QueryService"]

_EXPORTS = dict.fromkeys(__all__, "deeptarget.query.service") | {"ExplainService": "deeptarget.query.explain"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
