"""train-head on a small dataset the test makes: visually distinct classes, random-weight embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget.models.heads import HeadSet, head_versions
from deeptarget.training.datasets import load_labelled
from deeptarget.training.train_head import train_head
from tests.conftest import make_settings
from tests.helpers import make_dataset


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


def test_k_fold_gives_k_results_and_the_report_has_its_figures(tmp_path: Path) -> None:
    make_dataset(tmp_path / "photos")
    settings = make_settings(tmp_path / "data")
    trained = train_head(settings, tmp_path / "photos", "colour", folds=3)
    folds = trained.metrics["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3]
    assert sum(f["images"] for f in folds) == 36  # every usable image is held out exactly once
    assert all(f["top1"] > 0.6 for f in folds)

    assert trained.report_path == settings.reports_dir / "head-colour-v1" / "index.html"
    page = trained.report_path.read_text()
    for figure in ("learning_curves", "confusion_matrix", "embedding_map"):
        png = trained.report_path.parent / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"id='{figure}'" in page and "data:image/png;base64," in page
    assert "3-fold cross-validation" in page and "tomatoes" in page


def test_the_dataset_argument_does_not_move_the_data_dir(tmp_path: Path) -> None:
    """``train-head DATA_DIR`` once shadowed ``--data-dir`` and wrote caches and heads into the dataset."""
    from deeptarget.cli import build_parser

    args = build_parser().parse_args(["--data-dir", str(tmp_path / "data"), "train-head", "photos", "--name", "x"])
    assert args.data_dir == str(tmp_path / "data") and args.images == "photos"


def test_compare_backbones_tables_accuracy_size_and_speed(tmp_path: Path) -> None:
    from deeptarget.training.backbones import BackboneSpec, compare_backbones, comparison_report

    make_dataset(tmp_path / "photos")
    settings = make_settings(tmp_path / "data")
    specs = [BackboneSpec.parse(text, settings) for text in ("mobilenet_v2", "efficientnet_b0=none")]
    assert specs[0] == BackboneSpec("mobilenet_v2", "none", "imagenet")  # the configured backbone's own settings
    results = compare_backbones(settings, tmp_path / "photos", specs, timing_images=8)
    assert [r.model_id.split(":")[0] for r in results] == ["mobilenet_v2", "efficientnet_b0"]
    mobilenet, efficientnet = results
    assert mobilenet.parameters_m == pytest.approx(2.22, abs=0.01)  # without its ImageNet classifier
    assert efficientnet.parameters_m == pytest.approx(4.01, abs=0.01)
    assert all(r.ms_per_image > 0 and r.metrics["top1"] > 0.5 and r.size_mb > r.parameters_m for r in results)
    page_path = comparison_report(tmp_path / "photos", results).write(tmp_path / "report")
    assert page_path.read_text().count("<tr>") == 3  # header and one row per backbone
    for figure in ("top1", "ms_per_image", "size_mb"):
        assert (tmp_path / "report" / f"{figure}.png").is_file()


def test_food101_layouts_are_read(tmp_path: Path) -> None:
    import json

    food = tmp_path / "food-101"
    make_dataset(food / "images", per_class=4)
    (food / "meta").mkdir()
    lists = {name: [f"{name}/{i}" for i in range(4)] for name in ("grass", "sky", "tomatoes")}
    (food / "meta" / "train.json").write_text(json.dumps({c: ids[:3] for c, ids in lists.items()}))
    (food / "meta" / "test.json").write_text(json.dumps({c: ids[3:] for c, ids in lists.items()}))
    data = load_labelled(food)
    assert data.classes == ["grass", "sky", "tomatoes"] and len(data.train) == 9 and len(data.test) == 3
    assert all(p.is_file() and p.parent.parent == food / "images" for p, _ in data.train + data.test)
    assert [label for _, label in data.test] == [0, 1, 2]

    subset = tmp_path / "subset"  # the shared assets' layout: class folders with train.txt / test.txt beside them
    make_dataset(subset, per_class=4)
    (subset / "train.txt").write_text("".join(f"{c}/{i}\n" for c in lists for i in range(3)))
    (subset / "test.txt").write_text("".join(f"{c}/3\n" for c in lists))
    data = load_labelled(subset)
    assert len(data.train) == 9 and [p.name for p, _ in data.test] == ["3.jpg"] * 3
