"""``deeptarget reclassify``: apply the published heads to the embeddings already in the metadata store, so a new
head version reaches every stored post without decoding or embedding an image again; then refresh the profiles
(and so the audiences) of the posts' owners."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress

from deeptarget.core.terminal import shown
from deeptarget.models.heads import HeadSet, LinearHead, head_names, head_versions, published_file
from deeptarget.profiles.builder import rebuild_profiles
from deeptarget.profiles.outliers import FollowerBounds
from deeptarget.store.metadata import MetadataStore

LOG = logging.getLogger(__name__)


@dataclass
class Reclassified:
    posts: dict[str, int] = field(default_factory=dict)  # head -> posts given its new predictions
    heads: dict[str, int] = field(default_factory=dict)  # head -> the version applied
    profiles: int = 0


def published_heads(heads_dir: Path, names: list[str] | None = None) -> list[LinearHead]:
    """The published version of each head (of ``names``, or all), whatever embedder it was trained on."""
    chosen = names or head_names(heads_dir)
    heads = []
    for name in chosen:
        path = published_file(head_versions(heads_dir, name))
        if path is None:
            LOG.warning("head %s has no version in %s", name, heads_dir)
            continue
        heads.append(LinearHead.load(path))
    return heads


def reclassify(
    store: MetadataStore,
    heads: list[LinearHead],
    *,
    half_life_days: float,
    outlier_k: float,
    batch: int = 4096,
) -> Reclassified:
    """Each head classifies the stored embeddings of the model it was trained on; other posts are left alone."""
    result = Reclassified()
    owners: set[str] = set()
    with Progress(transient=True) as progress:
        for head in heads:
            total = store.count_embeddings(head.model_id)
            task = progress.add_task(f"{shown(head.name)} v{head.version}", total=total)
            result.heads[head.name] = head.version
            result.posts[head.name] = 0
            for rows in store.embeddings_of_model(head.model_id, batch=batch):
                predictions = HeadSet.predictions(head, rows.vectors)
                store.set_head_predictions(head.name, dict(zip(rows.post_ids, predictions, strict=True)))
                owners |= store.owners_of(rows.post_ids)
                result.posts[head.name] += len(rows.post_ids)
                progress.advance(task, len(rows.post_ids))
            if not total:
                LOG.warning("no stored embedding was made by %s, which head %s was trained on", head.model_id,
                            head.name)  # fmt: skip
    bounds = FollowerBounds.of(store.follower_counts(), outlier_k)
    result.profiles = len(rebuild_profiles(store, sorted(owners), half_life_days, bounds))
    return result
