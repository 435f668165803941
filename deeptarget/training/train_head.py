"""``deeptarget train-head``: embed a labelled folder once with the configured backbone (cached by image hash and
model id), fit a linear head on the training split, report it on the held-out split (and by K-fold cross-validation
on request) in a table and an HTML report, save it as a new version of
the head (published on request, and then picked up by running workers without a restart)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from deeptarget.core.errors import ImageRejected
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import shown
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder
from deeptarget.models.heads import LinearHead, check_head_name, head_versions, publish_head
from deeptarget.reports.html import report_folder
from deeptarget.store.versioned import atomic_write
from deeptarget.training.datasets import LabelledImages, check_usable, load_labelled
from deeptarget.training.linear import classification_metrics, cross_validate, fit_logistic
from deeptarget.training.report import Evaluation, explain_mistakes, stratified_sample, training_report

LOG = logging.getLogger(__name__)


@dataclass
class TrainedHead:
    head: LinearHead
    metrics: dict[str, object]
    train_images: int
    test_images: int
    skipped: int
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)


class EmbeddingCache:
    """Embeddings by (image sha256, model id), in one file per model under ``<data_dir>/embedding-cache``."""

    def __init__(self, directory: Path, model_id: str) -> None:
        self.path = Path(directory) / f"{hashlib.sha256(model_id.encode()).hexdigest()[:16]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                self.vectors = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.vectors))
        vectors = np.stack(list(self.vectors.values())) if self.vectors else np.zeros((0, 0), np.float32)
        atomic_write(self.path, lambda handle: np.savez(handle, keys=keys, vectors=vectors))


def embed_files(settings: Settings, embedder: Embedder, paths: list[Path]) -> tuple[np.ndarray, list[bool]]:
    """(embeddings of the usable files, which files were usable)."""
    cache = EmbeddingCache(settings.data_dir / "embedding-cache", embedder.model_id)
    keys = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    missing = [i for i, k in enumerate(keys) if k not in cache.vectors]
    usable = [True] * len(paths)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"embedding with {shown(embedder.model_id)}", total=len(missing))
        for start in range(0, len(missing), embedder.micro_batch):
            chunk, images = missing[start : start + embedder.micro_batch], []
            for i in chunk:
                try:
                    images.append(decode_image(paths[i].read_bytes(), max_pixels=settings.max_image_pixels,
                                               long_side=settings.decode_long_side))  # fmt: skip
                except ImageRejected as err:
                    LOG.warning("%s skipped: %s", paths[i], err)
                    usable[i] = False
            good = [i for i in chunk if usable[i]]
            for i, vector in zip(good, embedder(images), strict=True):
                cache.vectors[keys[i]] = vector
            progress.advance(task, len(chunk))
    if missing:
        cache.save()
    vectors = [cache.vectors[k] for k, ok in zip(keys, usable, strict=True) if ok]
    return (np.stack(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)), usable


@dataclass(frozen=True)
class EmbeddedSplits:
    """A labelled folder's usable images with their frozen embeddings (unreadable files dropped and counted)."""

    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    train_x: np.ndarray
    test_x: np.ndarray
    skipped: int

    @property
    def train_y(self) -> np.ndarray:
        return np.array([label for _, label in self.train], np.int64)

    @property
    def test_y(self) -> np.ndarray:
        return np.array([label for _, label in self.test], np.int64)


def embed_splits(settings: Settings, embedder: Embedder, data: LabelledImages) -> EmbeddedSplits:
    train_x, train_ok = embed_files(settings, embedder, [p for p, _ in data.train])
    test_x, test_ok = embed_files(settings, embedder, [p for p, _ in data.test])
    train = [item for item, ok in zip(data.train, train_ok, strict=True) if ok]
    test = [item for item, ok in zip(data.test, test_ok, strict=True) if ok]
    check_usable("the readable images", LabelledImages(data.classes, train, test))
    return EmbeddedSplits(
        train=train,
        test=test,
        train_x=train_x,
        test_x=test_x,
        skipped=train_ok.count(False) + test_ok.count(False),
    )


def train_head(
    settings: Settings,
    data_dir: Path,
    name: str,
    publish: bool = False,
    l2: float = 1e-3,
    folds: int = 0,
    report: bool = True,
) -> TrainedHead:
    check_head_name(name)  # before any work: it names the head's folder and its report's
    data = load_labelled(data_dir)
    embedder = Embedder.from_settings(settings)
    splits = embed_splits(settings, embedder, data)
    train_x, train_y, test_x, test_y = splits.train_x, splits.train_y, splits.test_x, splits.test_y
    fold_metrics = []
    if folds:
        everything = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
        fold_metrics = cross_validate(*everything, data.classes, folds, l2=l2)
    fit = fit_logistic(train_x, train_y, len(data.classes), l2=l2, held_out=(test_x, test_y))
    probabilities = fit.probabilities(test_x)
    metrics = classification_metrics(probabilities, test_y, data.classes)
    if fold_metrics:
        metrics["folds"] = fold_metrics
    version = head_versions(settings.heads_dir, name).next_version()
    head = LinearHead(
        name, version, data.classes, fit.weight, fit.bias, embedder.model_id,
        {k: float(v) for k, v in metrics.items() if isinstance(v, float)},
    )  # fmt: skip
    head.save(settings.heads_dir)
    if publish:
        publish_head(settings.heads_dir, name, head.version)
    skipped = splits.skipped
    trained = TrainedHead(head, metrics, len(train_y), len(test_y), skipped)
    if report:
        evaluation = Evaluation(
            data.classes,
            test_y,
            probabilities,
            [p for p, _ in splits.test],
            metrics,
            history=fit.history,
            folds=fold_metrics,
        )
        evaluation.explained = explain_mistakes(settings, embedder, head, evaluation)
        vectors, labels = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
        sample = stratified_sample(labels)
        summary = [
            f"Linear head {name!r} v{version} on frozen {embedder.model_id} embeddings of {data_dir}: "
            f"{len(train_y)} training images, {len(test_y)} held out, {skipped} unusable; L2 {l2}."
        ]
        page = training_report(f"train-head {name} v{version}", evaluation, vectors[sample], labels[sample], summary)
        trained.report_path = page.write(report_folder(settings.reports_dir, f"head-{name}-v{version}"))
    return trained
