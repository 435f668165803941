"""The report of a training run: metrics tables, learning curves, confusion matrix, the most confused class pairs
with example images, heat maps of the worst mistakes (where the model looked for the class it chose and for the
true one), and a 2-D map of the embeddings coloured by class."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix

from deeptarget.core.errors import ImageRejected
from deeptarget.core.settings import Settings
from deeptarget.reports import figures
from deeptarget.reports.html import Report
from deeptarget.training.linear import SCORES, fold_statistics

if TYPE_CHECKING:
    from deeptarget.models.embedder import Embedder
    from deeptarget.models.heads import LinearHead

LOG = logging.getLogger(__name__)

MAP_POINTS = 3000  # t-SNE is quadratic-ish: a class-stratified sample beyond this many points
CONFUSED_PAIRS = 6
WORST_EXPLAINED = 6  # the most confidently wrong held-out images, each with two heat maps


@dataclass(frozen=True)
class ExplainedMistake:
    """A misclassified held-out image with where the model looked for the class it chose and for the true one."""

    path: Path
    true: str
    predicted: str
    probability: float  # of the predicted class
    image: np.ndarray  # what the model saw (the centre square)
    heat_predicted: np.ndarray
    heat_true: np.ndarray
    method: str


@dataclass
class Evaluation:
    """What a run measured on its held-out images."""

    classes: list[str]
    labels: np.ndarray  # (n,) true class indices
    probabilities: np.ndarray  # (n, classes)
    paths: list[Path]  # the held-out images, for examples
    metrics: dict[str, object]
    history: list[dict[str, float]] = field(default_factory=list)
    history_x: str = "evaluation"
    history_x_label: str = "L-BFGS loss evaluation"
    folds: list[dict[str, object]] = field(default_factory=list)
    explained: list[ExplainedMistake] = field(default_factory=list)


def map_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE of ``vectors`` (after PCA to 50 dimensions), or PCA alone when there are too few points for t-SNE."""
    vectors = np.asarray(vectors, np.float32)
    if len(vectors) < 10:
        return PCA(n_components=2, random_state=seed).fit_transform(vectors), "PCA"
    reduced = PCA(n_components=min(50, *vectors.shape), random_state=seed).fit_transform(vectors)
    perplexity = float(min(30, (len(vectors) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(reduced), "t-SNE"


def most_confused(matrix: np.ndarray, limit: int = CONFUSED_PAIRS) -> list[tuple[int, int, int]]:
    """(true, predicted, count) for the largest off-diagonal cells, largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:limit]
    cells = [(*np.unravel_index(i, off.shape), 0) for i in order]
    return [(int(t), int(p), int(off[t, p])) for t, p, _ in cells if off[t, p] > 0]


def worst_mistakes(labels: np.ndarray, probabilities: np.ndarray, limit: int = WORST_EXPLAINED) -> list[int]:
    """Indices of the misclassified images, most confidently wrong first (the probability of the chosen class)."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    return [int(i) for i in order[:limit]]


def explain_mistakes(
    settings: Settings,
    embedder: Embedder,
    head: LinearHead,
    evaluation: Evaluation,
    limit: int = WORST_EXPLAINED,
) -> list[ExplainedMistake]:
    """Heat maps (``models/explain.py``, its default method) of the worst mistakes among the held-out images: one
    for the class the head chose, one for the true class. Images that cannot be read again are left out."""
    from deeptarget.models.decode import decode_image  # PIL
    from deeptarget.models.explain import Explainer, centre_square  # torch and captum

    e = evaluation
    chosen, images = [], []
    for i in worst_mistakes(e.labels, e.probabilities, limit):
        try:
            data = Path(e.paths[i]).read_bytes()
            s = settings
            images.append(decode_image(data, max_pixels=s.max_image_pixels, long_side=s.decode_long_side,
                                       max_decode_bytes=s.max_decode_bytes))  # fmt: skip
        except (OSError, ImageRejected) as err:
            LOG.warning("%s left out of the explained mistakes: %s", e.paths[i], err)
            continue
        chosen.append(i)
    if not chosen:
        return []
    explainer = Explainer(embedder, head)
    batch = explainer.batch(images)
    predicted = [int(e.probabilities[i].argmax()) for i in chosen]
    heat_predicted = explainer.heatmaps(batch, predicted)
    heat_true = explainer.heatmaps(batch, [int(e.labels[i]) for i in chosen])
    return [
        ExplainedMistake(Path(e.paths[i]), e.classes[int(e.labels[i])], e.classes[p], float(e.probabilities[i, p]),
                         centre_square(image), hp, ht, explainer.method)
        for i, p, image, hp, ht in zip(chosen, predicted, images, heat_predicted, heat_true, strict=True)
    ]  # fmt: skip


def training_report(
    title: str, evaluation: Evaluation, map_vectors: np.ndarray, map_labels: np.ndarray, summary: Sequence[str]
) -> Report:
    e = evaluation
    report = Report(title)
    for line in summary:
        report.text(line)
    m = e.metrics
    report.heading("Held-out metrics")
    shown = [k for k in SCORES if k in m]  # no top-5 for two classes
    report.table(["images", *(SCORES[k] for k in shown)], [[len(e.labels), *(m[k] for k in shown)]])
    per_class = m["per_class"]
    assert isinstance(per_class, dict)
    support = np.bincount(e.labels, minlength=len(e.classes))
    report.table(
        ["class", "precision", "recall", "images"],
        [[c, per_class[c]["precision"], per_class[c]["recall"], int(support[i])] for i, c in enumerate(e.classes)],
    )
    if e.folds:
        report.heading(f"{len(e.folds)}-fold cross-validation")
        rows = [[f["fold"], f["images"], *(f[k] for k in SCORES)] for f in e.folds]
        statistics = fold_statistics(e.folds)
        for label, which in (("mean", 0), ("std", 1)):
            rows.append([label, "", *(statistics[k][which] for k in SCORES)])
        report.table(["fold", "images", *SCORES.values()], rows)
    if e.history:
        report.heading("Learning curves")
        report.figure(
            "learning_curves",
            figures.learning_curves(e.history, e.history_x, e.history_x_label),
            "loss and accuracy on the training and held-out images during training",
        )
    predicted = e.probabilities.argmax(axis=1)
    matrix = confusion_matrix(e.labels, predicted, labels=np.arange(len(e.classes)))
    report.heading("Confusion matrix")
    report.figure("confusion_matrix", figures.confusion_matrix(matrix, e.classes), "held-out images, rows = truth")
    pairs = []
    for true, pred, count in most_confused(matrix):
        examples = [p for p, t, q in zip(e.paths, e.labels, predicted, strict=True) if t == true and q == pred]
        pairs.append((e.classes[true], e.classes[pred], count, examples))
    report.heading("Most confused classes")
    if pairs:
        report.table(["true", "predicted as", "images"], [[t, p, n] for t, p, n, _ in pairs])
        report.figure("confused_examples", figures.confused_examples(pairs), "held-out images behind each pair")
    else:
        report.text("No held-out image was misclassified.")
    if e.explained:
        report.heading("Where the model looked on its worst mistakes")
        mistakes = [
            (f"{m.true} → {m.predicted} ({m.probability:.2f})\n{m.path.name}", m.image,
             [(f"for {m.predicted} (chosen)", m.heat_predicted), (f"for {m.true} (true)", m.heat_true)])
            for m in e.explained
        ]  # fmt: skip
        report.figure(
            "explained_mistakes",
            figures.heatmap_examples(mistakes),
            f"the {len(mistakes)} most confidently wrong held-out images; heat maps ({e.explained[0].method}) of the "
            "chosen and of the true class (red: the regions that raised the class's score most)",
        )
    points, method = map_2d(map_vectors)
    report.heading("Embedding map")
    report.figure(
        "embedding_map",
        figures.embedding_map(points, map_labels, e.classes, method),
        f"{method} of {len(points)} image embeddings, coloured by their true class",
    )
    return report


def stratified_sample(labels: np.ndarray, limit: int = MAP_POINTS, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` items keeping every class's share."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    share = limit / len(labels)
    chosen = [
        rng.choice(idx, max(1, round(len(idx) * share)), replace=False)
        for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(chosen))
