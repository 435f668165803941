"""``deeptarget compare-backbones``: the Pinterest study's table. For each backbone, a linear head on its frozen
embeddings (cached, as in train-head): held-out top-1, top-5 and macro-F1, the model's size, and the time it takes
to embed one image here (decoded images, preprocessing and forward pass, after a warm-up batch)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from deeptarget.core.errors import ImageRejected
from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder
from deeptarget.reports import figures
from deeptarget.reports.html import Report
from deeptarget.training.datasets import load_labelled
from deeptarget.training.linear import classification_metrics, fit_logistic, score
from deeptarget.training.train_head import embed_splits

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """``name`` or ``name=weights`` or ``name=weights:normalization`` (weights as in the settings)."""

    name: str
    weights: str
    normalization: str

    @classmethod
    def parse(cls, text: str, settings: Settings) -> BackboneSpec:
        name, _, rest = text.partition("=")
        weights, _, normalization = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not rest:  # the configured weights for the configured backbone, whatever is cached for the others
            same = name == settings.backbone
            return cls(
                name, settings.weights if same else "auto", settings.weights_normalization if same else "imagenet"
            )
        return cls(name, weights, normalization or "imagenet")


@dataclass(frozen=True)
class BackboneResult:
    spec: BackboneSpec
    model_id: str
    parameters_m: float
    size_mb: float
    ms_per_image: float
    metrics: dict[str, object]


def compare_backbones(
    settings: Settings, data_dir: Path, specs: list[BackboneSpec], timing_images: int = 64
) -> list[BackboneResult]:
    data = load_labelled(data_dir)
    results = []
    for spec in specs:
        embedder = Embedder(spec.name, spec.weights, spec.normalization, settings.image_size, settings.device,
                            settings.micro_batch)  # fmt: skip
        splits = embed_splits(settings, embedder, data)
        fit = fit_logistic(splits.train_x, splits.train_y, len(data.classes))
        metrics = classification_metrics(fit.probabilities(splits.test_x), splits.test_y, data.classes)
        parameters = sum(p.numel() for p in embedder.model.parameters())
        size = sum(t.numel() * t.element_size() for t in embedder.model.state_dict().values())
        ms = embedding_ms_per_image(settings, embedder, [p for p, _ in data.test][:timing_images])
        results.append(BackboneResult(spec, embedder.model_id, parameters / 1e6, size / 1e6, ms, metrics))
        LOG.info("%s: top-1 %.3f, %.1f ms per image", embedder.model_id, metrics["top1"], ms)
    return results


def embedding_ms_per_image(settings: Settings, embedder: Embedder, paths: list[Path]) -> float:
    images = []
    for path in paths:
        try:
            images.append(decode_image(path.read_bytes(), max_pixels=settings.max_image_pixels,
                                       long_side=settings.decode_long_side))  # fmt: skip
        except ImageRejected:
            continue
    if not images:
        return float("nan")
    embedder(images[: embedder.micro_batch])  # warm-up: first-call allocations and kernel choices
    start = time.perf_counter()
    embedder(images)
    return (time.perf_counter() - start) * 1000 / len(images)


def comparison_report(data_dir: Path, results: list[BackboneResult]) -> Report:
    report = Report(f"compare-backbones on {data_dir}")
    report.text(
        "A class-balanced logistic regression on each backbone's frozen, L2-normalised embeddings, scored on the "
        "held-out split. Time per image: preprocessing and forward pass on this machine, decoded images given."
    )
    report.table(
        ["backbone", "weights", "parameters (M)", "size (MB)", "ms / image", "top-1", "top-5", "macro-F1"],
        [
            [r.spec.name, r.model_id.split(":")[1], r.parameters_m, r.size_mb, r.ms_per_image,
             r.metrics["top1"], r.metrics["top5"], r.metrics["macro_f1"]]
            for r in results
        ],
    )  # fmt: skip
    labels = [r.model_id.rsplit(":", 2)[0] for r in results]
    for key, title, axis in (
        ("top1", "held-out top-1 accuracy", "accuracy"),
        ("ms_per_image", "embedding time per image", "milliseconds"),
        ("size_mb", "model size", "MB"),
    ):
        values = {
            label: score(r.metrics, key) if key in r.metrics else float(getattr(r, key))
            for label, r in zip(labels, results, strict=True)
        }
        report.figure(key, figures.bars(values, title, axis), title)
    return report
