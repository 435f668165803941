"""Labelled image folders in the layouts people have: ``train/`` and ``test/`` with one folder per class, Food-101's
``meta/train.json`` / ``meta/test.json`` (images at ``images/class/image_id.jpg``), the shared subset's ``train.txt`` /
``test.txt`` (``class/image_id`` lines, images at ``class/image_id.jpg``), or one folder per class (then split,
stratified, with a fixed seed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeptarget.core.errors import ConfigurationError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class LabelledImages:
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def _class_folders(root: Path) -> dict[str, list[Path]]:
    return {
        folder.name: sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for folder in sorted(root.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
    }


def _listed_splits(root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]] | None:
    """Food-101's lists of ``class/image_id``: ``meta/train.json`` (class -> ids) with images under ``images/``, or
    ``train.txt`` (one id a line) with the class folders beside it. None when neither is there."""
    meta = root / "meta"
    if (meta / "train.json").is_file() and (meta / "test.json").is_file():

        def from_json(name: str) -> list[tuple[str, Path]]:
            lists: dict[str, list[str]] = json.loads((meta / name).read_text())
            return [(c, root / "images" / f"{row}.jpg") for c, rows in lists.items() for row in rows]

        return from_json("train.json"), from_json("test.json")
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():

        def from_text(name: str) -> list[tuple[str, Path]]:
            rows = [line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
            return [(row.split("/")[0], root / f"{row}.jpg") for row in rows]

        return from_text("train.txt"), from_text("test.txt")
    return None


def load_labelled(root: Path, test_share: float = 0.2, seed: int = 0) -> LabelledImages:
    """The labelled images of ``root``; raises ``ConfigurationError`` when there is no folder there or too little in
    it to train and evaluate a head (images of two classes to train on, one image to hold out)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigurationError(f"{root}: not a folder")
    return check_usable(root, _load(root, test_share, seed))


def check_usable(where: object, data: LabelledImages) -> LabelledImages:
    if len({label for _, label in data.train}) < 2 or not data.test:
        raise ConfigurationError(
            f"{where}: {len(data.train)} training images in {len({label for _, label in data.train})} classes and "
            f"{len(data.test)} held out: a head needs images of at least 2 classes to train on, and some to hold out"
        )
    return data


def _load(root: Path, test_share: float, seed: int) -> LabelledImages:
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_folders, test_folders = _class_folders(root / "train"), _class_folders(root / "test")
        classes = sorted(set(train_folders) | set(test_folders))
        index = {c: i for i, c in enumerate(classes)}
        return LabelledImages(
            classes,
            [(p, index[c]) for c, paths in train_folders.items() for p in paths],
            [(p, index[c]) for c, paths in test_folders.items() for p in paths],
        )
    listed = _listed_splits(root)
    if listed is not None:
        train_rows, test_rows = listed
        classes = sorted({c for c, _ in train_rows + test_rows})
        index = {c: i for i, c in enumerate(classes)}
        return LabelledImages(classes, [(p, index[c]) for c, p in train_rows], [(p, index[c]) for c, p in test_rows])
    folders = _class_folders(root)
    if len(folders) < 2:
        raise ConfigurationError(
            f"{root}: expected train/ and test/, meta/train.json and meta/test.json, train.txt and test.txt, "
            "or a folder per class"
        )
    rng = np.random.default_rng(seed)
    classes = sorted(folders)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        paths = list(folders[name])
        rng.shuffle(paths)
        n_test = max(1, round(len(paths) * test_share))
        test += [(p, label) for p in paths[:n_test]]
        train += [(p, label) for p in paths[n_test:]]
    return LabelledImages(classes, train, test)
