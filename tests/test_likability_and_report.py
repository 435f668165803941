"""train-likability and the live report on a metadata store the test fills: engagement follows the image's
embedding, two accounts have outlying follower counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget.cli import main
from deeptarget.core.records import Owner, Post, Prediction
from deeptarget.core.settings import Settings
from deeptarget.models.heads import LinearHead, head_versions
from deeptarget.store.metadata import MetadataStore
from deeptarget.training.likability import likability_labels, train_likability
from tests.conftest import make_settings

MODEL = "test-model"
ACCOUNTS, POSTS_EACH, DIM = 30, 12, 32


def fill_store(settings: Settings) -> tuple[MetadataStore, int]:
    """Posts whose engagement is high when their embedding leans one way; returns the store and outlier posts."""
    rng = np.random.default_rng(3)
    store = MetadataStore(settings.metadata_database)
    direction = rng.normal(size=DIM)
    results = []
    for account in range(ACCOUNTS):
        outlier = account < 2
        followers = int(5_000_000 if outlier else rng.normal(2000, 300))
        owner = Owner(id=f"u{account}", username=f"user{account}", followers_count=followers)
        for n in range(POSTS_EACH):
            vector = rng.normal(size=DIM)
            vector /= np.linalg.norm(vector)
            leaning = float(vector @ direction)
            engagement = 0.05 * np.exp(1.5 * leaning + rng.normal(0, 0.3))
            post = Post(id=f"p{account}-{n}", hashtags=["sushi", "food"] if n % 3 else ["selfie"],
                        like_count=int(engagement * followers), owner=owner)  # fmt: skip
            prediction = Prediction(
                post_id=post.id, status="embedded", faces=int(n % 4 == 0), model_id=MODEL,
                classes={"food": {"sushi": 0.8, "ramen": 0.2} if n % 2 else {"sushi": 0.3, "ramen": 0.7}},
            )  # fmt: skip
            results.append((post, None, prediction, vector.astype(np.float32)))
    results.append((Post(id="bad"), None, Prediction(post_id="bad", status="rejected", reason="not_an_image"), None))
    store.record_results(results)
    return store, 2 * POSTS_EACH


def test_likability_labels_leave_outliers_out_and_split_at_the_median(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store, outlier_posts = fill_store(settings)
    data = likability_labels(store, MODEL, settings.follower_outlier_k)
    assert data.outlier_posts == outlier_posts
    assert len(data.labels) == (ACCOUNTS - 2) * POSTS_EACH
    assert data.labels.sum() == len(data.labels) // 2  # top half against bottom half
    assert data.engagement[data.labels == 1].min() > data.threshold >= data.engagement[data.labels == 0].max()


def test_a_likability_head_learns_what_lands_with_an_audience(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    fill_store(settings)
    trained = train_likability(settings, publish=True)
    m = trained.metrics
    assert trained.model_id == MODEL and trained.outlier_posts == 2 * POSTS_EACH
    assert m["accuracy"] >= 0.75 and m["average_precision"] >= 0.75  # chance: 0.5 and the positive share
    assert m["average_precision"] > m["positive_share"] + 0.2
    head = LinearHead.load(head_versions(settings.heads_dir, "likability").path(1))
    assert head.classes == ["not_likable", "likable"] and head.model_id == MODEL
    assert head_versions(settings.heads_dir, "likability").current() == 1
    assert (trained.report_path.parent / "engagement.png").is_file()
    assert trained.train_posts + trained.test_posts == (ACCOUNTS - 2) * POSTS_EACH


def test_likability_refuses_an_empty_store(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no embeddings yet"):
        train_likability(make_settings(tmp_path / "data"))


def test_the_live_report_draws_the_system(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path / "data")
    fill_store(settings)
    out = tmp_path / "report"
    assert main(["--data-dir", str(settings.data_dir), "report", "--out", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for figure in ("posts_by_status", "posts_per_hashtag", "face_share", "rejections", "classes_food", "engagement"):
        assert (out / f"{figure}.png").read_bytes()[:4] == b"\x89PNG", figure
        assert f"id='{figure}'" in page
    assert "25.0% of the 360 processed posts show a face" in page
    assert "<td>sushi</td><td>240</td>" in page and "<td>not_an_image</td><td>1</td>" in page
