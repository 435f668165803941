"""Explanations (``models/explain.py``, ``query/explain.py``, ``deeptarget explain``) on small models the tests make: a
MobileNetV2 with calibrated random weights, heads fitted or drawn here. The shape and range of the heat maps, the
top classes, a case whose answer is known (a class decided by a bright patch in one corner: the heat map's mass
must lie in that corner), the command writing its PNG, and hostile inputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeptarget.cli import main
from deeptarget.core.errors import ConfigurationError, ImageRejected, NotFoundError
from deeptarget.core.settings import Settings
from deeptarget.models.embedder import Embedder
from deeptarget.models.explain import DEFAULT_METHOD, METHODS, Explainer, target_layer
from deeptarget.models.heads import LinearHead, publish_head
from deeptarget.query.explain import ExplainService
from deeptarget.training.linear import fit_logistic
from tests.conftest import make_settings
from tests.helpers import calibrated_random_weights, jpeg_of, make_dataset

SIZE = 96  # small and quick: MobileNetV2's last block is 3 x 3 here
# The corner test's size: 7 x 7. At 128 px (4 x 4) random weights localise too coarsely for Grad-CAM to put most of
# its mass in the patch's corner (0.3 to 0.5); at 224 px it puts 0.71 to 0.80 there over three weight seeds.
CORNER_SIZE = 224
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_random_weights(tmp_path_factory.mktemp("weights") / "mnv2.pth", SIZE)


@pytest.fixture(scope="module")
def embedder(weights: Path) -> Embedder:
    return Embedder("mobilenet_v2", str(weights), "imagenet", SIZE, "cpu")


def noise(rng: np.random.Generator, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return rng.normal(110, 30, (height, width, 3)).clip(0, 255).astype(np.uint8)


def with_patch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright red square of a quarter of the side, in the top-left corner (a few pixels of jitter)."""
    side = image.shape[0] // 4
    top, left = rng.integers(0, 6, 2)
    patched = image.copy()
    patched[top : top + side, left : left + side] = (230, 20, 20)
    return patched


def drawn_head(embedder: Embedder, classes: list[str], name: str = "drawn", seed: int = 0) -> LinearHead:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 3, (len(classes), embedder.dim)).astype(np.float32)
    return LinearHead(name, 1, classes, weight, np.zeros(len(classes), np.float32), embedder.model_id, {})


def fit_patch_head(embedder: Embedder) -> LinearHead:
    """A head that tells images with the corner patch from plain noise, fitted on 2 x 24 images."""
    rng = np.random.default_rng(1)
    size = embedder.image_size
    plain = [noise(rng, size, size) for _ in range(24)]
    patched = [with_patch(noise(rng, size, size), rng) for _ in range(24)]
    x = embedder(plain + patched)
    y = np.array([0] * 24 + [1] * 24)
    fit = fit_logistic(x, y, 2, l2=1e-4)
    head = LinearHead("patch", 1, ["plain", "patch"], fit.weight, fit.bias, embedder.model_id, {})
    assert (head(x).argmax(1) == y).mean() == 1.0
    return head


@pytest.fixture(scope="module")
def patch_head(embedder: Embedder) -> LinearHead:
    return fit_patch_head(embedder)


@pytest.mark.parametrize("method", METHODS)
def test_a_heat_map_has_the_input_size_and_unit_range_and_the_classes_are_ranked(
    embedder: Embedder, method: str
) -> None:
    classes = ["a", "b", "c", "d", "e", "f", "g"]
    explainer = Explainer(embedder, drawn_head(embedder, classes), method)
    image = noise(np.random.default_rng(3), 120, 160)
    explanation = explainer.explain(image)
    assert explanation.heatmap.shape == (SIZE, SIZE) and explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() == pytest.approx(1.0)
    assert explanation.image.shape == (120, 120, 3)  # the centre square the model saw
    names = [c for c, _ in explanation.classes]
    probabilities = [p for _, p in explanation.classes]
    assert len(names) == 5 and set(names) <= set(classes)
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert explanation.explained == f"class:{names[0]}" and explanation.score == pytest.approx(probabilities[0])
    assert explanation.method == method
    png = explanation.png()
    assert png[:8] == PNG_MAGIC and min(Image.open(io.BytesIO(png)).size) >= 120

    chosen = explainer.explain(image, "g")  # a named class, whatever its rank
    assert chosen.explained == "class:g" and chosen.heatmap.shape == (SIZE, SIZE)
    with pytest.raises(NotFoundError, match="no class 'zebra'"):
        explainer.explain(image, "zebra")


def test_the_similarity_heat_map_and_its_cosine(embedder: Embedder) -> None:
    rng = np.random.default_rng(4)
    image, other = noise(rng), noise(rng)
    explainer = Explainer(embedder)
    itself = explainer.explain_similarity(image, embedder([image])[0], "p1")
    assert itself.explained == "similar:p1" and itself.score == pytest.approx(1.0, abs=1e-4)
    assert itself.classes == []  # no head
    another = explainer.explain_similarity(image, embedder([other])[0], "p2")
    assert another.heatmap.shape == (SIZE, SIZE) and 0.0 <= another.heatmap.min() <= another.heatmap.max() <= 1.0
    assert another.score < itself.score
    with pytest.raises(ConfigurationError, match="needs a head"):
        explainer.explain(image)
    with pytest.raises(ConfigurationError, match="values"):
        explainer.explain_similarity(image, np.zeros(7, np.float32))


def test_a_head_of_another_model_and_an_unknown_method_are_refused(embedder: Embedder) -> None:
    other = LinearHead("x", 1, ["a", "b"], np.zeros((2, embedder.dim), np.float32), np.zeros(2, np.float32),
                       "resnet50:imagenet:imagenet:224", {})  # fmt: skip
    with pytest.raises(ConfigurationError, match="trained on resnet50"):
        Explainer(embedder, other)
    with pytest.raises(ConfigurationError, match="unknown explanation method"):
        Explainer(embedder, method="lime")


def test_the_layer_explained_is_the_last_conv_block_of_each_backbone() -> None:
    import torchvision

    from deeptarget.cli import explain as command

    assert command.METHODS == METHODS and command.DEFAULT_METHOD == DEFAULT_METHOD  # the command's, without torch

    mobilenet = torchvision.models.mobilenet_v2(weights=None)
    assert target_layer("mobilenet_v2", mobilenet) is mobilenet.features[-1]
    resnet = torchvision.models.resnet18(weights=None)
    assert target_layer("resnet50", resnet) is resnet.layer4[-1]
    with pytest.raises(ConfigurationError):
        target_layer("vit_b_16", mobilenet)


@pytest.fixture(scope="module")
def corner_embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    weights = calibrated_random_weights(tmp_path_factory.mktemp("weights") / "mnv2-224.pth", CORNER_SIZE)
    return Embedder("mobilenet_v2", str(weights), "imagenet", CORNER_SIZE, "cpu")


@pytest.fixture(scope="module")
def corner_head(corner_embedder: Embedder) -> LinearHead:
    return fit_patch_head(corner_embedder)


@pytest.mark.parametrize("method", METHODS)
def test_the_heat_map_of_a_class_decided_by_a_corner_patch_lies_in_that_corner(
    corner_embedder: Embedder, corner_head: LinearHead, method: str
) -> None:
    rng = np.random.default_rng(7)
    images = [with_patch(noise(rng, CORNER_SIZE, CORNER_SIZE), rng) for _ in range(4)]
    explainer = Explainer(corner_embedder, corner_head, method)
    maps = explainer.heatmaps(explainer.batch(images), [1] * len(images))
    half = CORNER_SIZE // 2
    corner = maps[:, :half, :half].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))
    assert corner.mean() > 0.6, corner  # a quarter of the area: 0.25 by chance
    assert (corner > 0.45).all(), corner


def test_the_training_report_shows_the_worst_mistakes_with_their_heat_maps(tmp_path: Path, embedder: Embedder) -> None:
    from deeptarget.training.report import Evaluation, explain_mistakes, training_report, worst_mistakes

    make_dataset(tmp_path / "photos", per_class=4)
    paths = sorted((tmp_path / "photos").glob("*/*.jpg"))  # broken.jpg among them: left out
    labels = np.array([["grass", "sky", "tomatoes"].index(p.parent.name) for p in paths])
    probabilities = np.full((len(paths), 3), 0.1)
    probabilities[np.arange(len(paths)), (labels + 1) % 3] = np.linspace(0.5, 0.8, len(paths))  # all wrong
    probabilities[0] = [0.8, 0.1, 0.1]  # but the first, which is right
    broken = [p.name for p in paths].index("broken.jpg")
    probabilities[broken] = [0.05, 0.05, 0.9]  # the worst mistake, and unreadable
    assert worst_mistakes(labels, probabilities, 3) == [broken, len(paths) - 1, len(paths) - 2]
    evaluation = Evaluation(["grass", "sky", "tomatoes"], labels, probabilities, paths, {"top1": 0.0, "per_class": {
        c: {"precision": 0.0, "recall": 0.0} for c in ("grass", "sky", "tomatoes")}})  # fmt: skip
    head = drawn_head(embedder, evaluation.classes)
    settings = make_settings(tmp_path / "data")
    evaluation.explained = explain_mistakes(settings, embedder, head, evaluation, limit=3)
    assert [m.path for m in evaluation.explained] == [paths[-1], paths[-2]]  # broken.jpg left out
    for mistake in evaluation.explained:
        assert mistake.heat_predicted.shape == mistake.heat_true.shape == (SIZE, SIZE)
        assert mistake.true != mistake.predicted and mistake.method == DEFAULT_METHOD
    vectors = embedder([noise(np.random.default_rng(i)) for i in range(12)])
    page = training_report("t", evaluation, vectors, np.arange(12) % 3, ["a run"]).write(tmp_path / "report")
    assert "id='explained_mistakes'" in page.read_text()
    assert (tmp_path / "report" / "explained_mistakes.png").read_bytes()[:8] == PNG_MAGIC


# -- the service and the command ------------------------------------------------------------------------------------
@pytest.fixture
def deployed(tmp_path: Path, weights: Path, patch_head: LinearHead, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of the test's embedder (through the environment, as the command reads them) with the patch head
    published."""
    settings = make_settings(tmp_path / "data", weights=str(weights), image_size=SIZE)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    patch_head.save(settings.heads_dir)
    publish_head(settings.heads_dir, "patch", 1)
    return settings


def test_the_service_explains_a_published_head_and_names_what_it_does_not_know(deployed: Settings) -> None:
    service = ExplainService(deployed)
    rng = np.random.default_rng(8)
    explanation = service.explain(jpeg_of(with_patch(noise(rng), rng)), "patch")  # the most probable class
    assert explanation.explained == f"class:{explanation.classes[0][0]}" and len(explanation.classes) == 2
    assert service.explain(jpeg_of(noise(rng)), "patch", "patch", method="gradcam").explained == "class:patch"
    with pytest.raises(NotFoundError, match=r"no head 'food' \(heads: patch\)"):
        service.explain(jpeg_of(noise(rng)), "food")
    with pytest.raises(NotFoundError, match="no class 'dog'"):
        service.explain(jpeg_of(noise(rng)), "patch", "dog")
    with pytest.raises(ImageRejected) as rejected:
        service.explain(b"<html>not a picture</html>", "patch")
    assert rejected.value.reason == "not_an_image"


def test_explain_writes_the_overlay_and_prints_the_classes(
    deployed: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(9)
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_of(with_patch(noise(rng, 128, 128), rng)))
    out = tmp_path / "out.png"
    assert main(["explain", str(image), "--head", "patch", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "patch" in printed and "plain" in printed and str(out) in printed

    assert main(["explain", str(image), "--head", "patch", "--class", "plain", "--out", str(out), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["explained"] == "class:plain" and body["out"] == str(out) and body["method"] == DEFAULT_METHOD
    assert {c["class"] for c in body["classes"]} == {"patch", "plain"}
    assert sum(c["probability"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-5)


def bomb() -> bytes:
    """A PNG that declares 24M pixels in a few KB: over the limit the test sets."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 4000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("args", "data", "message"),
    [
        (["--head", "patch"], b"<!doctype html>not a picture", "not_an_image"),
        (["--head", "patch"], "bomb", "too_many_pixels"),
        (["--head", "patch"], b"", "empty_image"),
        (["--head", "food"], "photo", "no head 'food'"),
        (["--head", "patch", "--class", "dog"], "photo", "no class 'dog'"),
        (["--similar", "p1"], "photo", "no index snapshot yet"),
        ([], "photo", "needs --head"),
        (["--class", "plain", "--similar", "p1"], "photo", "--class needs --head"),
    ],
)
def test_hostile_or_unknown_inputs_are_clear_errors(
    deployed: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    args: list[str], data: bytes | str, message: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("DEEPTARGET_MAX_IMAGE_PIXELS", "4000000")
    image = tmp_path / "input.img"
    if data == "bomb":
        image.write_bytes(bomb())
    elif data == "photo":
        image.write_bytes(jpeg_of(noise(np.random.default_rng(10))))
    else:
        assert isinstance(data, bytes)
        image.write_bytes(data)
    out = tmp_path / "out.png"
    assert main(["explain", str(image), *args, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deeptarget: error: ") and message in error and "Traceback" not in error
    assert not out.exists()


def test_a_directory_a_missing_file_and_a_bad_head_name_are_refused(
    deployed: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(tmp_path), "--head", "patch"]) == 2
    assert "a directory, not a file" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.jpg"), "--head", "patch"]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(tmp_path), "--head", "../x"])
    assert exit_info.value.code == 2 and "head name '../x'" in capsys.readouterr().err
