"""train-head on a small dataset the test makes: visually distinct classes, random-weight embeddings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from deeptarget.models.heads import HeadSet, head_versions
from deeptarget.training.datasets import load_labelled
from deeptarget.training.train_head import train_head
from tests.conftest import make_settings


def make_dataset(root: Path, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    colours = {"tomatoes": (200, 30, 30), "sky": (40, 80, 210), "grass": (40, 170, 50)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (96, 128, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG")
            (root / name / f"{i}.jpg").write_bytes(buffer.getvalue())
    (root / "sky" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")


def test_a_trained_head_beats_chance_is_versioned_and_picked_up_when_published(tmp_path: Path) -> None:
    make_dataset(tmp_path / "photos")
    data = load_labelled(tmp_path / "photos")
    assert data.classes == ["grass", "sky", "tomatoes"] and len(data.train) + len(data.test) == 37
    assert {label for _, label in data.test} == {0, 1, 2}  # a stratified split
    settings = make_settings(tmp_path / "data")
    trained = train_head(settings, tmp_path / "photos", "colour")
    assert trained.metrics["top1"] >= 0.85  # chance is 1/3
    assert trained.metrics["top5"] == 1.0 and set(trained.metrics["per_class"]) == set(data.classes)
    assert trained.skipped == 1 and trained.head.version == 1
    assert head_versions(settings.heads_dir, "colour").current() is None  # saved, not published

    again = train_head(settings, tmp_path / "photos", "colour", publish=True)  # embeddings come from the cache
    assert again.head.version == 2 and (settings.data_dir / "embedding-cache").is_dir()
    np.testing.assert_allclose(again.head.weight, trained.head.weight, atol=1e-4)
    heads = HeadSet(settings.heads_dir, trained.head.model_id)
    assert heads.heads["colour"].version == 2
