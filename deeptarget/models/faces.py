"""Face detectors behind one interface (boxes + confidences) and the face filter policy built on them.

Detectors (measured on 181 face / 287 non-face real photos, CPU; see ../shared/assets/README.md):

    haar    OpenCV cascade, always available, the baseline        precision 0.775, recall 0.972
    yunet   OpenCV's CNN, when its ONNX file is configured        precision 0.989, recall 0.950, 20 ms/image
    mtcnn   facenet-pytorch's MTCNN, batched, for the GPU         precision 0.983, recall 0.961, 564 ms/image on CPU

``auto`` picks MTCNN on CUDA when facenet-pytorch is installed, else YuNet when its file is there (configured, or
fetched with ``deeptarget models fetch yunet``: ``models.files.face_model_file``), else Haar with a warning
(``choose_face_detector``, which ``deeptarget models list`` reports too).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, SupportsInt, runtime_checkable

import cv2
import cv2.data  # the Haar cascades' folder: a module cv2's stubs do not name
import numpy as np

from deeptarget.core.errors import ConfigurationError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in the decoded image
    confidence: float


def _int_box(values: Iterable[SupportsInt]) -> tuple[int, int, int, int]:
    x, y, width, height = (int(v) for v in values)
    return x, y, width, height


def _unscaled(box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """A box found in an image resized by ``scale``, in the original image's pixels."""
    x, y, width, height = box
    return round(x / scale), round(y / scale), round(width / scale), round(height / scale)


@runtime_checkable
class FaceDetector(Protocol):
    name: str
    batched: bool
    """True: detect_batch is faster than one call per image (a GPU model); the pipeline then calls it once per
    micro-batch from the model thread. False: single calls, run on the decode threads."""

    def __call__(self, image_rgb: np.ndarray) -> list[Face]: ...

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[list[Face]]: ...


class _OneByOne:
    batched = False

    def __call__(self, image_rgb: np.ndarray) -> list[Face]:
        raise NotImplementedError

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[list[Face]]:
        return [self(image) for image in images_rgb]


class HaarFaceDetector(_OneByOne):
    """OpenCV's frontal-face Haar cascade. Confidence is the cascade's level weight through a logistic.

    A CascadeClassifier must not be shared between threads (concurrent calls corrupt it and can crash the process),
    so each thread that calls the detector gets its own.
    """

    name = "haar"

    def __init__(self, min_size: int = 24, cascade: str = "haarcascade_frontalface_default.xml") -> None:
        self.path = Path(cv2.data.haarcascades) / cascade
        self.min_size = min_size
        self._local = threading.local()
        self._cascade()  # fail at construction, not at the first image

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = cv2.CascadeClassifier(str(self.path))
            if cascade.empty():
                raise ConfigurationError(
                    f"could not load Haar cascade {self.path} (opencv-python-headless must be < 5)"
                )
            self._local.cascade = cascade
        return cascade

    def __call__(self, image_rgb: np.ndarray) -> list[Face]:
        grey = cv2.equalizeHist(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY))
        boxes, _levels, weights = self._cascade().detectMultiScale3(
            grey,
            scaleFactor=1.1,
            minNeighbors=5,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        return [
            Face(_int_box(box), 1.0 / (1.0 + math.exp(-float(w))))
            for box, w in zip(boxes, np.ravel(weights), strict=False)
        ]


class YuNetFaceDetector(_OneByOne):
    """OpenCV's YuNet CNN (``cv2.FaceDetectorYN``) from a local ONNX file; works best with the long side <= 640."""

    name = "yunet"

    def __init__(self, model_path: Path, min_size: int = 24, score_threshold: float = 0.6) -> None:
        if not Path(model_path).is_file():
            raise ConfigurationError(
                f"YuNet model file {model_path} not found: put face_detection_yunet_2023mar.onnx there "
                "(OpenCV Zoo), or unset face_model_path and run `deeptarget models fetch yunet`, or set "
                "face_detector = 'haar'"
            )
        self.model_path = Path(model_path)
        self.min_size = min_size
        self.score_threshold = score_threshold
        self._local = threading.local()  # one detector per thread: it keeps per-call state (input size)
        self._detector()

    def _detector(self) -> cv2.FaceDetectorYN:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320), self.score_threshold)
            self._local.detector = detector
        return detector

    def __call__(self, image_rgb: np.ndarray) -> list[Face]:
        height, width = image_rgb.shape[:2]
        detector = self._detector()
        detector.setInputSize((width, height))
        _, found = detector.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        faces = []
        for row in [] if found is None else found:
            x, y, w, h = (round(float(v)) for v in row[:4])
            if min(w, h) >= self.min_size:
                faces.append(Face((x, y, w, h), float(row[-1])))
        return faces


MTCNN_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0 requests tqdm"


class MtcnnFaceDetector:
    """facenet-pytorch's MTCNN with the weights inside its wheel (no download), run on whole batches.

    facenet-pytorch 2.6 pins torch < 2.3 in its metadata but runs on current torch, hence ``--no-deps``. A batch must
    share one shape, so images are padded at the bottom and right to the largest size in the batch (black padding
    creates no faces and leaves box coordinates unchanged).
    """

    name = "mtcnn"
    batched = True

    def __init__(self, min_size: int = 24, device: str = "cpu", score_threshold: float = 0.7) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as err:
            raise ConfigurationError(f"face_detector = 'mtcnn' needs facenet-pytorch: {MTCNN_INSTALL}") from err
        self.min_size = min_size
        self.device = device
        self._model = MTCNN(
            keep_all=True,
            min_face_size=min_size,
            thresholds=[0.6, 0.7, score_threshold],
            device=device,
            post_process=False,
        )

    def __call__(self, image_rgb: np.ndarray) -> list[Face]:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[list[Face]]:
        if not images_rgb:
            return []
        height = max(im.shape[0] for im in images_rgb)
        width = max(im.shape[1] for im in images_rgb)
        batch = np.zeros((len(images_rgb), height, width, 3), np.uint8)
        for i, image in enumerate(images_rgb):
            batch[i, : image.shape[0], : image.shape[1]] = image
        boxes, probs = self._model.detect(batch)
        found: list[list[Face]] = []
        for image_boxes, image_probs in zip(boxes, probs, strict=True):
            faces = []
            for box, prob in zip([] if image_boxes is None else image_boxes, image_probs, strict=False):
                x1, y1, x2, y2 = (float(v) for v in box)
                x, y, w, h = round(x1), round(y1), round(x2 - x1), round(y2 - y1)
                if min(w, h) >= self.min_size:
                    faces.append(Face((x, y, w, h), float(prob)))
            found.append(faces)
        return found


def mtcnn_available() -> bool:
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class FaceResult:
    faces: list[Face] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.faces)

    @property
    def best_confidence(self) -> float | None:
        return max((f.confidence for f in self.faces), default=None)


class FaceFilter:
    """Runs a detector under a policy: ``require`` a face, ``tag`` (record only) or ``off``.

    Detection runs on a copy downscaled to ``long_side`` (cost grows with pixels; boxes come back in the image's
    coordinates). Haar on 383 sandbox pictures (68 with a face), by detection size:

        long side   ms/image   recall   false alarms   faces on skimage's astronaut
        400           51.5      0.971      2.2%             2 (one false)
        448           59.8      0.985      2.2%             1
        512           77.2      0.956      4.4%             1
        640           89.8      0.941      4.7%             1

    Haar is erratic across scales, so 448 is the default here; evaluate on real photos before changing it.
    """

    def __init__(
        self,
        detector: FaceDetector | None,
        policy: str = "tag",
        min_confidence: float = 0.0,
        long_side: int = 448,
    ) -> None:
        if policy not in ("require", "tag", "off"):
            raise ConfigurationError(f"face policy must be 'require', 'tag' or 'off', not {policy!r}")
        if policy != "off" and detector is None:
            raise ConfigurationError(f"face policy {policy!r} needs a detector")
        self.detector = detector
        self.policy = policy
        self.min_confidence = min_confidence
        self.long_side = long_side

    @property
    def batched(self) -> bool:
        return self.detector is not None and self.policy != "off" and self.detector.batched

    def __call__(self, image_rgb: np.ndarray) -> tuple[FaceResult, str | None]:
        """(faces found, rejection reason or None)."""
        return self.filter_batch([image_rgb])[0]

    def filter_batch(self, images_rgb: Sequence[np.ndarray]) -> list[tuple[FaceResult, str | None]]:
        if self.policy == "off" or self.detector is None:
            return [(FaceResult(), None) for _ in images_rgb]
        scales = [min(1.0, self.long_side / max(image.shape[:2])) for image in images_rgb]
        small = [
            image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            for image, scale in zip(images_rgb, scales, strict=True)
        ]
        outcomes = []
        for found, scale in zip(self.detector.detect_batch(small), scales, strict=True):
            faces = [Face(_unscaled(f.box, scale), f.confidence) for f in found if f.confidence >= self.min_confidence]
            reason = "no_face" if self.policy == "require" and not faces else None
            outcomes.append((FaceResult(faces), reason))
        return outcomes


def choose_face_detector(kind: str, model_path: Path | None, device: str = "cpu") -> tuple[str, str]:
    """The detector ``kind`` means on this machine, and why: ``auto`` is MTCNN on CUDA when facenet-pytorch is
    installed, else YuNet when ``model_path`` (the configured or fetched file) is given, else Haar."""
    if kind != "auto":
        return kind, "configured"
    if device.startswith("cuda") and mtcnn_available():
        return "mtcnn", "auto: CUDA and facenet-pytorch are here"
    if model_path is not None:
        return "yunet", f"auto: YuNet file {model_path}"
    return "haar", "auto: no YuNet file (deeptarget models fetch yunet)"


def build_face_detector(kind: str, min_size: int, model_path: Path | None = None, device: str = "cpu") -> FaceDetector:
    """The configured detector; ``auto`` picks the best one this machine can run (``choose_face_detector``)."""
    chosen, _why = choose_face_detector(kind, model_path, device)
    if kind == "auto" and chosen == "haar":
        LOG.warning(
            "face detector: the Haar cascade (precision 0.775 on real photos, against YuNet's 0.989): no YuNet file. "
            "Run `deeptarget models fetch yunet`, or set DEEPTARGET_FACE_MODEL_PATH to its .onnx file"
        )
    kind = chosen
    if kind == "haar":
        return HaarFaceDetector(min_size=min_size)
    if kind == "yunet":
        if model_path is None:
            raise ConfigurationError(
                "face_detector = 'yunet' needs its .onnx file: run `deeptarget models fetch yunet`, or set "
                "face_model_path to the YuNet .onnx file"
            )
        return YuNetFaceDetector(model_path, min_size=min_size)
    if kind == "mtcnn":
        return MtcnnFaceDetector(min_size=min_size, device=device)
    raise ConfigurationError(f"unknown face detector {kind!r}: expected 'auto', 'haar', 'yunet' or 'mtcnn'")
