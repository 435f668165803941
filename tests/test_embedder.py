from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from deeptarget.core.errors import ConfigurationError
from deeptarget.models.embedder import BACKBONES, Embedder, torchvision_cache_file


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.set_num_threads(1)
    return Embedder("mobilenet_v2", weights="none", image_size=96, device="cpu")


def test_embeddings_are_unit_float32_rows_of_the_backbone_width(embedder: Embedder) -> None:
    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.camera()[..., None].repeat(3, 2)]
    vectors = embedder(images)
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder(images[:1]).shape == (1, 1280)
    assert embedder([]).shape == (0, 1280)


def test_random_weights_are_the_same_in_every_process(embedder: Embedder) -> None:
    """Workers and the API embed separately; without pinned random weights their vectors would not compare."""
    torch.manual_seed(1234)  # whatever the global RNG state is
    other = Embedder("mobilenet_v2", weights="none", image_size=96, device="cpu")
    image = [skimage.data.chelsea()]
    assert other.model_id == embedder.model_id
    np.testing.assert_allclose(other(image), embedder(image), atol=1e-5)


def test_similar_pictures_are_closer_than_different_ones(embedder: Embedder) -> None:
    cat = skimage.data.chelsea()
    vectors = embedder([cat, cat[:, ::-1], cat[20:-20, 30:-30], skimage.data.rocket()])
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 3] and similarity[0, 2] > similarity[0, 3]


def test_weights_from_a_file_are_named_by_their_content(tmp_path: Path) -> None:
    path = tmp_path / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    loaded = Embedder("mobilenet_v2", weights=str(path), normalization="inception", image_size=64, device="cpu")
    assert loaded.model_id.startswith("mobilenet_v2:file-") and "inception" in loaded.model_id


def test_wrong_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigurationError, match="does not fit"):
        Embedder("mobilenet_v2", weights=str(path), device="cpu")
    with pytest.raises(ConfigurationError, match="not found"):
        Embedder("mobilenet_v2", weights=str(tmp_path / "missing.pth"), device="cpu")


def test_missing_pretrained_weights_name_the_file_and_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigurationError) as err:
        Embedder("resnet50", weights="imagenet", device="cpu")
    expected = torchvision_cache_file(BACKBONES["resnet50"])
    assert str(expected) in str(err.value) and expected.name == "resnet50-0676ba61.pth"
    assert str(tmp_path) in str(expected)


def test_auto_falls_back_to_random_weights_when_nothing_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert ":random0:" in Embedder("efficientnet_b0", weights="auto", image_size=64, device="cpu").model_id


def test_unknown_backbone_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown backbone"):
        Embedder("vgg_from_2014")
