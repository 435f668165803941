from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget.core.errors import ConfigurationError
from deeptarget.models.heads import HeadSet, LinearHead, publish_head

MODEL = "mobilenet_v2:random0:imagenet:96"


def head(version: int, bias: list[float], model_id: str = MODEL) -> LinearHead:
    return LinearHead(
        name="food",
        version=version,
        classes=["sushi", "pizza"],
        weight=np.zeros((2, 4), np.float32),
        bias=np.array(bias, np.float32),
        model_id=model_id,
        metrics={"top1": 0.9},
    )


def test_heads_round_trip_and_give_probabilities(tmp_path: Path) -> None:
    loaded = LinearHead.load(head(1, [2.0, 0.0]).save(tmp_path))
    probs = loaded(np.ones((3, 4), np.float32))
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[0, 0] > probs[0, 1] and loaded.metrics == {"top1": 0.9}


def test_published_version_is_used_and_new_ones_are_picked_up_without_restart(tmp_path: Path) -> None:
    head(1, [2.0, 0.0]).save(tmp_path)
    heads = HeadSet(tmp_path, MODEL)
    assert heads(np.ones((1, 4), np.float32))[0]["food"]["sushi"] > 0.5
    head(2, [0.0, 2.0]).save(tmp_path)
    publish_head(tmp_path, "food", 1)  # version 2 exists, version 1 stays published
    heads.refresh()
    assert heads.heads["food"].version == 1
    publish_head(tmp_path, "food", 2)
    heads.refresh()
    assert heads.heads["food"].version == 2
    assert heads(np.ones((1, 4), np.float32))[0]["food"]["pizza"] > 0.5


def test_heads_of_another_embedder_are_skipped(tmp_path: Path) -> None:
    head(1, [0.0, 0.0], model_id="resnet50:imagenet:imagenet:224").save(tmp_path)
    assert HeadSet(tmp_path, MODEL).heads == {}


def test_publishing_a_missing_version_fails(tmp_path: Path) -> None:
    head(1, [0.0, 0.0]).save(tmp_path)
    with pytest.raises(ConfigurationError):
        publish_head(tmp_path, "food", 7)
