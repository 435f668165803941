"""The models, for workers and notebooks: image decoding, the embedder, face detection, classification heads, their
explanations (captum heat maps) and the hashtag model. Names are imported on first use (``deeptarget.core.lazy``):
importing one submodule, such as ``deeptarget.models.heads`` for a name check, loads neither torch nor OpenCV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeptarget.core.lazy import lazy_exports

if TYPE_CHECKING:
    from deeptarget.models.decode import decode_image
    from deeptarget.models.embedder import BACKBONES, Embedder, EmbedderSpec
    from deeptarget.models.explain import Explainer, Explanation
    from deeptarget.models.faces import Face, FaceDetector, FaceFilter, FaceResult, build_face_detector
    from deeptarget.models.hashtags import HashtagModel
    from deeptarget.models.heads import HeadSet, LinearHead, head_names, head_versions, publish_head

__all__ = [
    "BACKBONES",
    "Embedder",
    "EmbedderSpec",
    "Explainer",
    "Explanation",
    "Face",
    "FaceDetector",
    "FaceFilter",
    "FaceResult",
    "HashtagModel",
    "HeadSet",
    "LinearHead",
    "build_face_detector",
    "decode_image",
    "head_names",
    "head_versions",
    "publish_head",
]

_EXPORTS = {
    "decode_image": "deeptarget.models.decode",
    "BACKBONES": "deeptarget.models.embedder",
    "Embedder": "deeptarget.models.embedder",
    "EmbedderSpec": "deeptarget.models.embedder",
    "Explainer": "deeptarget.models.explain",
    "Explanation": "deeptarget.models.explain",
    "Face": "deeptarget.models.faces",
    "FaceDetector": "deeptarget.models.faces",
    "FaceFilter": "deeptarget.models.faces",
    "FaceResult": "deeptarget.models.faces",
    "build_face_detector": "deeptarget.models.faces",
    "HashtagModel": "deeptarget.models.hashtags",
    "HeadSet": "deeptarget.models.heads",
    "LinearHead": "deeptarget.models.heads",
    "head_names": "deeptarget.models.heads",
    "head_versions": "deeptarget.models.heads",
    "publish_head": "deeptarget.models.heads",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
