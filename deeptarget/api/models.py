"""The API's response bodies. Handlers build these, and the OpenAPI document is generated from them, so the two
cannot drift apart."""

from __future__ import annotations

from typing import Literal

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


class CheckBody(BaseModel):
    ok: bool | None = Field(description="true: works; false: down or behind; null: cannot tell (Redis is down).")
    error: str | None = Field(None, description="What is wrong: a failure's kind, never a host, port or path.")


class BlobsBody(CheckBody):
    free_bytes: int | None = Field(None, description="Free space on the blob store's volume.")


class WriterBody(CheckBody):
    heartbeat_age_s: float | None = Field(None, description="Seconds since the index writer's last heartbeat.")
    vectors: int | None = Field(None, description="Vectors in the writer's index (published or not yet).")
    version: int | None = Field(None, description="The writer's last published snapshot.")
    unpublished: int | None = Field(None, description="Changes made since that snapshot.")
    snapshot_failures: int | None = Field(None, description="Snapshots that failed in a row (a full disk?).")


class BacklogBody(CheckBody):
    unindexed: int | None = Field(None, description="Embedded posts in the store that the index does not hold yet.")
    oldest_s: float | None = Field(None, description="How long the oldest of them has waited.")


class IngestLagBody(BaseModel):
    waiting: int = Field(description="Pushed posts on the ingest stream not handled yet.")
    oldest_s: float | None = Field(None, description="How long the oldest of them has waited.")


class HealthBody(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="ok (HTTP 200): every dependency answers and every stage keeps up; degraded (HTTP 503): one or "
        "more does not, named in problems. Reads may still work: /readyz says whether they can."
    )
    problems: list[str] = Field(description="The checks that are not ok, by name.")
    redis: bool | str = Field(description="true, or 'down: <kind of failure>'.")
    database: CheckBody
    blobs: BlobsBody
    index: dict[str, object] | str = Field(
        description="The index this API serves (vectors, model_id, kind, nprobe, version, age_s: seconds since its "
        "snapshot was written), or 'no snapshot yet'."
    )
    writer: WriterBody = Field(description="The index writer, from its heartbeat in Redis.")
    backlog: BacklogBody = Field(description="Stored posts waiting for the index.")
    queues: dict[str, int] | None = Field(description="Tasks waiting per Celery queue; null when Redis is down.")
    ingest: IngestLagBody | None = Field(description="The ingest stream's lag; null when Redis is down.")


class ReadyBody(BaseModel):
    status: Literal["ready", "not ready"] = Field(
        description="ready (HTTP 200): reads can be served (the database answers, and the published index is loaded "
        "or none was published yet); not ready (HTTP 503). Redis is not needed for reads and is not checked."
    )
    problems: list[str]
    database: CheckBody
    index: CheckBody


class LiveBody(BaseModel):
    status: Literal["alive"] = Field(description="The process serves requests (HTTP 200 whenever it answers).")


class ClassProbability(BaseModel):
    name: str = Field(description="A class of the head.")
    probability: float


class ExplainBody(BaseModel):
    explained: str = Field(description="What the heat map explains: class:<name> or similar:<post id>.")
    score: float = Field(description="The explained class's probability, or the cosine similarity to the post.")
    method: str = Field(description="The captum method that made the heat map (gradcam or occlusion).")
    head: str | None = Field(None, description="The head whose classes are given (its published version).")
    classes: list[ClassProbability] = Field(description="The head's top classes, most probable first.")
    png: str = Field(description="The image the model saw with the heat map over it: a PNG, base64.")
