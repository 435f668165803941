from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from deeptarget.core.errors import ConfigurationError
from deeptarget.models.faces import (
    MTCNN_INSTALL,
    FaceFilter,
    HaarFaceDetector,
    MtcnnFaceDetector,
    build_face_detector,
    mtcnn_available,
)


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector(min_size=24)


def test_haar_finds_the_astronauts_face(haar: HaarFaceDetector) -> None:
    faces = haar(skimage.data.astronaut())
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 200  # Eileen Collins' face, not the suit or the shuttle
    assert 0.5 < faces[0].confidence <= 1.0


def test_haar_finds_no_face_in_a_cup_of_coffee(haar: HaarFaceDetector) -> None:
    assert haar(skimage.data.coffee()) == []


def test_policy_require_rejects_faceless_images_and_tag_does_not(haar: HaarFaceDetector) -> None:
    coffee, astronaut = skimage.data.coffee(), skimage.data.astronaut()
    assert FaceFilter(haar, "require")(coffee)[1] == "no_face"
    result, reason = FaceFilter(haar, "require")(astronaut)
    assert reason is None and result.count == 1
    assert FaceFilter(haar, "tag")(coffee)[1] is None
    assert FaceFilter(None, "off")(astronaut)[0].count == 0


def test_minimum_confidence_filters_faces(haar: HaarFaceDetector) -> None:
    result, _ = FaceFilter(haar, "tag", min_confidence=1.0)(skimage.data.astronaut())
    assert result.count == 0


def test_detectors_are_configured_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="onnx"):
        build_face_detector("yunet", 24, None)
    with pytest.raises(ConfigurationError, match="not found"):
        build_face_detector("yunet", 24, tmp_path / "yunet.onnx")
    with pytest.raises(ConfigurationError, match="unknown face detector"):
        build_face_detector("dlib", 24)


def test_boxes_come_back_in_the_coordinates_of_the_full_image(haar: HaarFaceDetector) -> None:
    astronaut = skimage.data.astronaut()
    large = np.repeat(np.repeat(astronaut, 2, axis=0), 2, axis=1)  # 1024 px: detection runs on a 448 px copy
    result, _ = FaceFilter(haar, "tag", long_side=448)(large)
    assert result.count == 1
    x, y, w, h = result.faces[0].box
    assert 300 < x + w / 2 < 600 and 120 < y + h / 2 < 400 and w > 120


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnFaceDetector:
    if not mtcnn_available():
        pytest.skip(f"facenet-pytorch is not installed ({MTCNN_INSTALL}; ./dt does it)")
    return MtcnnFaceDetector(min_size=24)


def test_mtcnn_finds_the_astronauts_face_in_a_batch_of_mixed_sizes(mtcnn: MtcnnFaceDetector) -> None:
    astronaut, coffee = skimage.data.astronaut(), skimage.data.coffee()  # 512x512 and 400x600: padded to one shape
    found = mtcnn.detect_batch([coffee, astronaut, astronaut[:300, :400]])
    assert [len(f) for f in found] == [0, 1, 1]
    x, y, w, h = found[1][0].box
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 200 and found[1][0].confidence > 0.9
    assert found[2][0].box == pytest.approx(found[1][0].box, abs=3)  # the padding moved nothing


def test_batched_filter_applies_the_policy_per_image(mtcnn: MtcnnFaceDetector) -> None:
    face_filter = FaceFilter(mtcnn, "require", long_side=448)
    assert face_filter.batched
    outcomes = face_filter.filter_batch([skimage.data.coffee(), skimage.data.astronaut()])
    assert [reason for _, reason in outcomes] == ["no_face", None]
    assert outcomes[1][0].count == 1


def test_auto_picks_mtcnn_on_cuda_only_and_yunet_when_its_file_is_set(tmp_path: Path) -> None:
    assert build_face_detector("auto", 24, None, device="cpu").name == "haar"
    with pytest.raises(ConfigurationError, match="not found"):  # auto chose YuNet because a file was configured
        build_face_detector("auto", 24, tmp_path / "yunet.onnx", device="cpu")
