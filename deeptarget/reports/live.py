"""``deeptarget report``: the live system at a glance, from the metadata store: posts per status and hashtag,
the face share, why posts were rejected, what the heads see, and how engaging the posts are."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from deeptarget.reports import figures
from deeptarget.reports.html import Report
from deeptarget.store.metadata import MetadataStore

TOP_HASHTAGS = 30


def system_report(store: MetadataStore, top_hashtags: int = TOP_HASHTAGS) -> Report:
    report = Report("deeptarget: the live system")
    statuses = store.status_counts()
    report.heading("Posts")
    by_count = sorted(statuses.items(), key=lambda kv: -kv[1])
    report.table(["status", "posts"], by_count)
    report.figure("posts_by_status", figures.bars(statuses, "posts by status", "posts"), "every post the store knows")

    hashtags = store.hashtag_counts(top_hashtags)
    report.heading("Hashtags")
    if hashtags:
        report.figure(
            "posts_per_hashtag",
            figures.bars(hashtags, f"posts per hashtag (top {len(hashtags)})", "posts"),
            "hashtags on the stored posts, whatever their status",
        )
        report.table(["hashtag", "posts"], list(hashtags.items()))
    else:
        report.text("No post carries a hashtag yet.")

    faces = Counter[str]()
    predicted: dict[str, Counter[str]] = defaultdict(Counter)
    engagement: list[float] = []
    for rows in store.usable_summaries():
        for row in rows:
            faces["with a face" if (row["faces"] or 0) > 0 else "no face"] += 1
            for head, probabilities in json.loads(row["classes"] or "{}").items():
                if probabilities:
                    predicted[head][max(probabilities, key=probabilities.get)] += 1
            if row["like_count"] is not None and (row["owner_followers"] or 0) > 0:
                engagement.append(row["like_count"] / row["owner_followers"])
    usable = sum(faces.values())
    report.heading("Faces")
    if usable:
        share = faces["with a face"] / usable
        report.text(f"{share:.1%} of the {usable} processed posts show a face.")
        report.figure("face_share", figures.bars(dict(faces), "processed posts with a face", "posts"), "face share")
    rejections = store.rejection_reasons()
    if rejections:
        report.table(["rejected because", "posts"], list(rejections.items()))
        report.figure("rejections", figures.bars(rejections, "why posts were rejected", "posts"), "rejections")

    report.heading("Classes")
    if not predicted:
        report.text("No head has classified a post yet (train one with deeptarget train-head).")
    for k, (head, counts) in enumerate(sorted(predicted.items())):
        ordered = dict(counts.most_common())
        name = f"classes_{_slug(head)}"
        report.figure(
            name if name not in report.figures else f"{name}_{k}",  # two heads may slug alike
            figures.bars(ordered, f"head {head}: most probable class per post", "posts"),
            f"class distribution of head {head} over {sum(counts.values())} posts",
        )
        report.table([f"{head}: most probable class", "posts"], list(ordered.items()))

    report.heading("Engagement")
    if engagement:
        values = np.array(engagement)
        report.text(
            f"likes / followers over {len(values)} posts: median {np.median(values):.4g}, "
            f"90th percentile {np.quantile(values, 0.9):.4g}."
        )
        report.figure(
            "engagement",
            figures.histogram(values, "engagement per post", "likes / followers", log_x=True),
            "posts with no like are left off the log axis",
        )
    else:
        report.text("No processed post has both a like count and its owner's follower count.")
    return report


def write_system_report(store: MetadataStore, folder: Path) -> Path:
    return system_report(store).write(folder)


def _slug(text: str) -> str:
    """A file name's worth of ``text`` (a head name from the store: data): ASCII letters and digits, bounded."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text)[:64]
