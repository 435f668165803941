"""Labelled image folders in the layouts people have: ``train/`` and ``test/`` with one folder per class, Food-101's
``train.txt`` / ``test.txt`` (``class/image_id`` lines, images at ``class/image_id.jpg``), or one folder per class
(then split, stratified, with a fixed seed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeptarget.errors import ConfigurationError

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


def load_labelled(root: Path, test_share: float = 0.2, seed: int = 0) -> LabelledImages:
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _class_folders(root / "train"), _class_folders(root / "test")
        classes = sorted(set(train) | set(test))
        index = {c: i for i, c in enumerate(classes)}
        return LabelledImages(
            classes,
            [(p, index[c]) for c, paths in train.items() for p in paths],
            [(p, index[c]) for c, paths in test.items() for p in paths],
        )
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():

        def listed(name: str) -> list[tuple[str, Path]]:
            rows = [line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
            return [(row.split("/")[0], root / f"{row}.jpg") for row in rows]

        train_rows, test_rows = listed("train.txt"), listed("test.txt")
        classes = sorted({c for c, _ in train_rows + test_rows})
        index = {c: i for i, c in enumerate(classes)}
        return LabelledImages(classes, [(p, index[c]) for c, p in train_rows], [(p, index[c]) for c, p in test_rows])
    folders = _class_folders(root)
    if len(folders) < 2:
        raise ConfigurationError(f"{root}: expected train/ and test/, train.txt and test.txt, or a folder per class")
    rng = np.random.default_rng(seed)
    classes = sorted(folders)
    train, test = [], []
    for label, name in enumerate(classes):
        paths = list(folders[name])
        rng.shuffle(paths)
        n_test = max(1, round(len(paths) * test_share))
        test += [(p, label) for p in paths[:n_test]]
        train += [(p, label) for p in paths[n_test:]]
    return LabelledImages(classes, train, test)
