"""The API's response bodies. Handlers build these, and the OpenAPI document is generated from them, so the two
cannot drift apart."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_REJECTED_SHOWN = 20  # an /ingest answer lists this many rejected records at most (and counts them all)


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, for humans.")
    reason: str | None = Field(None, description="A short stable code where there is one (e.g. too_many_pixels).")


class NeighbourBody(BaseModel):
    post_id: str
    score: float = Field(description="Cosine similarity to the query image.")
    hashtags: list[str]
    owner: str | None
    permalink: str | None
    faces: int | None


class SimilarBody(BaseModel):
    post_id: str | None = Field(None, description="The query post, for queries by post id.")
    results: list[NeighbourBody]


class HashtagScore(BaseModel):
    hashtag: str
    score: float


class HashtagsBody(BaseModel):
    hashtags: list[HashtagScore]
    neighbours: list[str] = Field(description="The indexed posts whose ALS factors described the image.")


class AudienceMember(BaseModel):
    user_id: str
    username: str | None
    score: float = Field(description="The user's weight share of the interest (0..1).")
    post_count: int
    followers_count: int | None
    median_engagement: float | None
    follower_outlier: bool | None


class AudienceBody(BaseModel):
    interest: str = Field(description="The interest as resolved: class:<head>:<label> or hashtag:<tag>.")
    users: list[AudienceMember]


class TaskAcceptedBody(BaseModel):
    task: str
    queue: str


class BadRecordBody(BaseModel):
    line: int = Field(description="1-based line (or array position) of the record")
    reason: str


class IngestBody(BaseModel):
    accepted: int = Field(description="Records queued for the scraper (it fetches their images).")
    rejected_count: int = Field(description="Records rejected, all of them.")
    rejected: list[BadRecordBody] = Field(
        description=f"The first rejected records ({MAX_REJECTED_SHOWN} at most), each with its line and reason."
    )


class DeletedBody(BaseModel):
    deleted: list[str]


class HealthBody(BaseModel):
    status: str = Field(description="ok, or degraded (HTTP 503) when Redis or the index is down.")
    redis: bool | str
    index: dict[str, object] | str
