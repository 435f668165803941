"""``deeptarget train-likability``: will a post land with its owner's audience? The likability study's labels, from
the metadata store: engagement = likes / followers; accounts whose follower count is an outlier (median +- k*MAD) are
left out; a post is ``likable`` when its engagement is in the top half of the rest. A linear head on the stored
embeddings learns it (no image is embedded again); held-out posts come from accounts the head never saw, since
engagement depends on the account as much as on the image."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings
from deeptarget.models.heads import LinearHead, head_versions, publish_head
from deeptarget.profiles.outliers import FollowerBounds
from deeptarget.reports import figures
from deeptarget.reports.html import report_folder
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from deeptarget.training.linear import classification_metrics, fit_logistic
from deeptarget.training.report import Evaluation, stratified_sample, training_report

LOG = logging.getLogger(__name__)

CLASSES = ["not_likable", "likable"]
MIN_POSTS = 20


@dataclass
class LikabilityLabels:
    vectors: np.ndarray
    labels: np.ndarray  # 1 = top half of engagement
    engagement: np.ndarray
    owners: list[str]
    blobs: list[str | None]
    threshold: float  # the median engagement
    outlier_posts: int  # left out: their account's follower count is an outlier


@dataclass
class LikabilityHead:
    head: LinearHead
    metrics: dict[str, object]
    train_posts: int
    test_posts: int
    outlier_posts: int
    model_id: str
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def likability_labels(store: MetadataStore, model_id: str, outlier_k: float) -> LikabilityLabels:
    rows = store.engagement_rows(model_id)
    bounds = FollowerBounds.of(store.follower_counts(), outlier_k)
    keep = np.array([not bounds.is_outlier(int(f)) for f in rows.followers], bool)
    engagement = rows.likes[keep] / rows.followers[keep]
    threshold = float(np.median(engagement)) if len(engagement) else 0.0
    return LikabilityLabels(
        vectors=rows.vectors[keep],
        labels=(engagement > threshold).astype(np.int64),
        engagement=engagement,
        owners=[o for o, k in zip(rows.owner_ids, keep, strict=True) if k],
        blobs=[b for b, k in zip(rows.blobs, keep, strict=True) if k],
        threshold=threshold,
        outlier_posts=int((~keep).sum()),
    )


def split_by_owner(owners: list[str], labels: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, ...]:
    """Train / test indices with no account on both sides; a stratified split when there are too few accounts."""
    indices = np.arange(len(labels))
    if len(set(owners)) >= 8:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_share, random_state=seed)
        train, test = next(splitter.split(indices, labels, groups=owners))
        if len(set(labels[test])) == 2 and len(set(labels[train])) == 2:
            return train, test
    LOG.warning("too few accounts (%d) for a split by account: splitting posts instead", len(set(owners)))
    return tuple(train_test_split(indices, test_size=test_share, stratify=labels, random_state=seed))


def train_likability(
    settings: Settings, model_id: str | None = None, publish: bool = False, test_share: float = 0.25, seed: int = 0
) -> LikabilityHead:
    store = MetadataStore(settings.metadata_database)
    known = store.model_ids()
    model_id = model_id or next(iter(known), None)
    if model_id is None:
        raise ConfigurationError("the metadata store holds no embeddings yet: process some posts first")
    data = likability_labels(store, model_id, settings.follower_outlier_k)
    if len(data.labels) < MIN_POSTS or len(set(data.labels.tolist())) < 2:
        raise ConfigurationError(
            f"{len(data.labels)} posts of {model_id} have likes and follower counts: need at least {MIN_POSTS}"
        )
    train, test = split_by_owner(data.owners, data.labels, test_share, seed)
    fit = fit_logistic(data.vectors[train], data.labels[train], 2, held_out=(data.vectors[test], data.labels[test]))
    probabilities = fit.probabilities(data.vectors[test])
    metrics = classification_metrics(probabilities, data.labels[test], CLASSES)
    metrics.pop("top5")  # two classes: always 1
    metrics["accuracy"] = metrics["top1"]
    metrics["average_precision"] = float(average_precision_score(data.labels[test], probabilities[:, 1]))
    metrics["roc_auc"] = float(roc_auc_score(data.labels[test], probabilities[:, 1]))
    metrics["positive_share"] = float(data.labels[test].mean())  # what a random ranking's average precision is
    version = head_versions(settings.heads_dir, "likability").next_version()
    head = LinearHead(
        "likability", version, CLASSES, fit.weight, fit.bias, model_id,
        {k: float(v) for k, v in metrics.items() if isinstance(v, float)},
    )  # fmt: skip
    head.save(settings.heads_dir)
    if publish:
        publish_head(settings.heads_dir, "likability", version)
    result = LikabilityHead(head, metrics, len(train), len(test), data.outlier_posts, model_id)

    blobs = BlobStore.for_settings(settings)
    paths = [_local_file(blobs, data.blobs[i]) for i in test]
    evaluation = Evaluation(CLASSES, data.labels[test], probabilities, paths, metrics, history=fit.history)
    summary = [
        f"Likability head v{version} on {model_id} embeddings from {settings.metadata_database_shown}: "
        f"{len(train)} training posts and {len(test)} held out (accounts never on both sides when there are "
        f"enough); {data.outlier_posts} posts of follower-count outliers left out "
        f"(k = {settings.follower_outlier_k}). Likable = engagement (likes / followers) above the median "
        f"{data.threshold:.4g}.",
        f"accuracy {metrics['accuracy']:.3f}, average precision {metrics['average_precision']:.3f} (a random ranking "
        f"scores {metrics['positive_share']:.3f}), ROC AUC {metrics['roc_auc']:.3f}",
    ]
    sample = stratified_sample(data.labels)
    page = training_report(
        f"likability head v{version}", evaluation, data.vectors[sample], data.labels[sample], summary
    )
    page.heading("Engagement")
    page.figure(
        "engagement",
        figures.histogram(data.engagement, "engagement of the labelled posts", "likes / followers", log_x=True),
        f"the median {data.threshold:.4g} splits likable from not likable",
    )
    result.report_path = page.write(report_folder(settings.reports_dir, f"head-likability-v{version}"))
    return result


def _local_file(blobs: BlobStore, sha: str | None) -> Path:
    """The image's file for the report's thumbnails (from the bucket when it is not here); a missing one draws none."""
    if not sha:
        return Path("/nonexistent")
    try:
        return blobs.file(sha)
    except OSError:
        return Path("/nonexistent")
