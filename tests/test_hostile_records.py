"""Records that once took other records (or a report) down with them (issue 12, M1, M2, M8)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from deeptarget.core.records import Owner, Post
from deeptarget.reports import figures
from deeptarget.scraper.structures import posts_from_media


def test_a_time_without_an_offset_is_taken_as_utc() -> None:
    post = Post(id="p", timestamp=datetime(2026, 11, 30, 12, 0))  # naive: the point of the test
    assert post.timestamp == datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    crawled = posts_from_media({"id": "c", "media_type": "IMAGE", "timestamp": "2026-11-30T12:00:00"}, source="x")
    assert crawled[0].timestamp is not None and crawled[0].timestamp.tzinfo is not None
    assert crawled[0].timestamp < datetime.now(UTC)  # comparable with aware times, as since/until compare them


@pytest.mark.parametrize("field", ["like_count", "comments_count"])
def test_counts_beyond_int64_are_refused_at_the_door(field: str) -> None:
    with pytest.raises(ValidationError):
        Post(id="p", **{field: 2**63})
    with pytest.raises(ValidationError):
        Owner(id="o", followers_count=2**63)
    with pytest.raises(ValueError):  # a crawled node: malformed_media for that node alone (engine._handle_page)
        posts_from_media({"id": "c", "media_type": "IMAGE", field: 2**64}, source="graph")


def test_labels_are_shown_as_written_never_parsed_as_mathtext() -> None:
    labels = {"$\\frac{": 3.0, "a$b$c$": 2.0, "$x^$": 1.0, "[/]": 1.0}
    for figure in (figures.bars(labels, "posts per #$tag$", "posts"), figures.bars(labels, "v", "n", False)):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")  # mathtext raised here on a malformed '$...$'
        assert buffer.getvalue().startswith(b"\x89PNG")
