"""One settings object for every process: scraper, workers, API, CLI.

Values come, highest priority first, from keyword arguments, ``DEEPTARGET_*`` environment variables,
a TOML file (passed as ``Settings.load(path)``, else named by ``DEEPTARGET_CONFIG``), and the defaults below.
Components receive a ``Settings`` instance; nothing reads the environment deep inside a module.

The fields are grouped by subsystem, one mixin each (``StorageSettings``, ``SourceSettings``, ... ``SandboxSettings``),
and ``Settings`` combines them. Every setting stays a flat attribute (``settings.batch_size``) with a flat
``DEEPTARGET_<NAME>`` variable and a top-level TOML key; a stage that needs one group only may type its parameter as
that mixin (a ``Settings`` is one).
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ByteSize, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource
from pydantic_settings.exceptions import SettingsError

from deeptarget.core.errors import ConfigurationError

CONFIG_ENV = "DEEPTARGET_CONFIG"

FacePolicy = Literal["require", "tag", "off"]

# The TOML file of the Settings.load running in this thread (or task): how the path reaches
# settings_customise_sources without a process-wide variable. Unset: DEEPTARGET_CONFIG names the file, if any.
_load_toml_file: ContextVar[Path | None] = ContextVar("deeptarget_settings_toml_file", default=None)


def _normalised_hashtags(tags: list[str]) -> list[str]:
    from deeptarget.core.records import normalise_hashtag

    return [normalise_hashtag(t) for t in tags]


class StorageSettings(BaseModel):
    """Where state lives: the data dir (SQLite, blobs, index snapshots, models, embedded Redis), Redis and the
    metadata store, and the paths derived from them."""

    data_dir: Path = Field(Path("data"), description="Metadata DB, blobs, index snapshots, models, embedded Redis.")
    redis_url: str | None = Field(
        None, description="External Redis (redis://host:port/db). Unset: the project starts its own embedded Redis."
    )
    database_url: SecretStr | None = Field(
        None,
        description="The metadata store: a SQLite file's path (default <data_dir>/metadata.sqlite3), or a "
        "postgresql://user:password@host/db URL when workers and APIs on several hosts share it (a secret: it may "
        "hold a password).",
    )

    model_cache_dir: Path | None = Field(
        None,
        description="Where `deeptarget models fetch` puts the model files deeptarget keeps itself (YuNet) and where "
        "the face filter finds them; unset: <data_dir>/models/files. torchvision's weights go to torchvision's own "
        "cache ($TORCH_HOME/hub/checkpoints).",
    )

    object_store_url: str | None = Field(
        None,
        description="s3://bucket/prefix: images and artefacts (index snapshots, hashtag models, heads, fine-tuned "
        "backbones) live in this S3-compatible bucket, and every process's data_dir is private to it (its cache). "
        "Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance "
        "role), never from here. Unset: the data dir holds everything (one host).",
    )
    object_store_endpoint: str | None = Field(
        None, description="The S3 endpoint for MinIO or another S3-compatible server (http://minio:9000); unset: AWS."
    )
    object_store_region: str | None = Field(None, description="The bucket's region; unset: boto3's (AWS_REGION).")
    object_store_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Connect and read timeout of one object-store request."
    )
    object_cache_bytes: int = Field(
        2 * 2**30, ge=0, description="Bound of this process's local cache of images read from the bucket."
    )

    @field_validator("object_store_url")
    @classmethod
    def _usable_object_store_url(cls, url: str | None) -> str | None:
        if url:
            from deeptarget.core.bucket_address import BucketAddress

            BucketAddress.parse(url)  # raises ValueError with the reason
        return url or None

    @field_validator("object_store_endpoint")
    @classmethod
    def _usable_object_store_endpoint(cls, url: str | None) -> str | None:
        if url and (problem := url_problem(url, ("http", "https"))):
            raise ValueError(f"{problem} (in {without_password(url)})")
        return url or None

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, url: SecretStr | None) -> SecretStr | None:
        location = None if url is None else url.get_secret_value()
        if location is not None and (problem := database_url_problem(location)):
            raise ValueError(f"{problem} (in {without_password(location)})")
        return url

    @field_validator("redis_url")
    @classmethod
    def _usable_redis_url(cls, url: str | None) -> str | None:
        if url is not None and (problem := url_problem(url, REDIS_SCHEMES)):
            raise ValueError(f"{problem} (in {without_password(url)})")
        return url

    @property
    def deadletter_path(self) -> Path:
        """Where dead letters go while Redis is down (workers/deadletter.py)."""
        return self.data_dir / "deadletter.jsonl"

    @property
    def metadata_database(self) -> str:
        """What ``MetadataStore`` opens: a ``postgresql://`` URL or a SQLite file's path."""
        if self.database_url is None:
            return str(self.data_dir / "metadata.sqlite3")
        return self.database_url.get_secret_value()

    @property
    def metadata_database_shown(self) -> str:
        """``metadata_database`` fit for logs and reports: a URL's password left out."""
        return without_password(self.metadata_database)

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def hashtag_model_dir(self) -> Path:
        return self.data_dir / "models" / "hashtags"

    @property
    def heads_dir(self) -> Path:
        return self.data_dir / "models" / "heads"

    @property
    def reports_dir(self) -> Path:
        """HTML reports of training runs and of the live system, with their PNGs."""
        return self.data_dir / "reports"

    @property
    def model_files_dir(self) -> Path:
        """Fetched model files of deeptarget's own (``models/files.py``): ``model_cache_dir`` or the data dir's."""
        return self.model_cache_dir if self.model_cache_dir is not None else self.data_dir / "models" / "files"

    @property
    def finetune_dir(self) -> Path:
        """Fine-tuning checkpoints and fine-tuned backbone weights, one folder per head name."""
        return self.data_dir / "models" / "finetuned"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"


class SourceSettings(BaseModel):
    """What the scraper reads and as whom: the Graph-API-shaped source, its tokens, the hashtags and accounts it
    follows and how far it pages through them, partner feeds and instaloader folders."""

    source_url: str = Field("http://127.0.0.1:8700", description="Base URL of a Graph-API-shaped source.")
    source_user_id: str = Field("17841400000000000", description="IG user id the API calls are made on behalf of.")
    access_tokens: list[SecretStr] = Field(default_factory=lambda: [SecretStr("sandbox-token")])
    token_apps: dict[str, list[SecretStr]] = Field(
        default_factory=dict,
        description="More access tokens, by the Meta app they belong to (a Graph #4 'Application request limit "
        "reached' pauses every token of that app). access_tokens belong to the app 'default'.",
    )
    token_in: Literal["query", "header"] = Field(
        "query",
        description="Where the token travels: the access_token query parameter, as Meta documents it, or an "
        "Authorization: Bearer header. Never in a log line, error or metric either way.",
    )
    hashtags: list[str] = Field(default_factory=list, description="Hashtags to follow (with or without '#').")
    accounts: list[str] = Field(default_factory=list, description="Usernames to follow via business_discovery.")
    hashtag_edge: Literal["recent_media", "top_media"] = "recent_media"
    page_size: int = Field(25, ge=1, le=50)
    max_pages_per_target: int = Field(
        0, ge=0, description="Pages per target per run (0 = to the end); the next run goes on from there."
    )
    max_pages_per_round: int = Field(
        2000, ge=1, description="A target that gives more pages in one round is taken to loop and ended there."
    )
    loop_after_stale_pages: int = Field(
        5,
        ge=1,
        description="Pages in a row that bring no post new to the round before a target is taken to loop (empty "
        "pages do not count: the API filters after paging; hashtag cursors repeat by design).",
    )
    jsonl_feeds: list[str] = Field(
        default_factory=list, description="HTTP(S) URLs of partner feeds: JSON lines of posts, read each round."
    )
    max_feed_bytes: int = Field(64 * 1024 * 1024, gt=0, description="A feed longer than this is cut off there.")
    instaloader_dirs: list[Path] = Field(
        default_factory=list, description="Instaloader download folders to read (again each round with --forever)."
    )
    max_sidecar_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="An instaloader metadata sidecar bigger than this (once decompressed) is that post's rejection.",
    )

    @field_validator("hashtags")
    @classmethod
    def _normalise_hashtags(cls, tags: list[str]) -> list[str]:
        return _normalised_hashtags(tags)

    @property
    def all_access_tokens(self) -> list[SecretStr]:
        """``access_tokens`` and the tokens of ``token_apps``, each once."""
        seen: dict[str, SecretStr] = {}
        for token in [*self.access_tokens, *(t for tokens in self.token_apps.values() for t in tokens)]:
            seen.setdefault(token.get_secret_value(), token)
        return list(seen.values())

    @property
    def token_app_of(self) -> dict[str, str]:
        """Token value -> the app it belongs to (``token_apps``; the rest: 'default')."""
        return {t.get_secret_value(): app for app, tokens in self.token_apps.items() for t in tokens}


class BudgetSettings(BaseModel):
    """The API's budgets the scraper keeps to: requests per token, pauses when throttled, the hashtag-search
    quota."""

    token_calls: int = Field(200, ge=1, description="Requests one access token may make per token_window_s.")
    token_window_s: float = Field(3600.0, gt=0, description="The rolling window of the token budget.")
    throttle_pause_s: float = Field(60.0, gt=0, description="A throttled token's pause when the API names none.")
    max_pause_s: float = Field(
        3600.0, gt=0, description="The longest pause any answer can impose (the Graph API's window is an hour)."
    )
    usage_pause_at: float = Field(95.0, gt=0, description="Usage-header percentage at which a token pauses.")
    hashtag_quota: int = Field(30, ge=1, description="Unique hashtags one IG user may search per rolling window.")
    hashtag_quota_days: float = Field(7.0, gt=0)


class FetchSettings(BaseModel):
    """The scraper's HTTP fetch policy: concurrency, timeouts, the hosts images may come from, retries and what a
    failed or oversized download becomes."""

    download_concurrency: int = Field(16, ge=1)
    per_host_concurrency: int = Field(16, ge=1, description="Connections to any one host at a time (politeness).")
    target_concurrency: int = Field(4, ge=1)
    http_timeout_s: float = Field(20.0, gt=0)
    image_hosts: list[str] = Field(
        default_factory=lambda: ["*.cdninstagram.com", "*.fbcdn.net"],
        description="Hosts images may be fetched from besides the source's own: patterns (public addresses, ports "
        "80/443), or host:port / IP entries (trusted as named, private addresses too); '*' = any public host.",
    )
    http_retries: int = Field(3, ge=0)
    max_download_failures: int = Field(
        3,
        ge=1,
        description="Times a post's image download may fail (each time after http_retries) before the post is "
        "recorded as rejected (download_failed); until then it waits on the ingest stream for a later run.",
    )
    download_retry_delay_s: float = Field(
        60.0, ge=0, description="A post whose download failed waits this long before it is tried again."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)


class ScraperSettings(BaseModel):
    """The scraper process: its name and claims, the ingest stream of pushed posts, the infer batches it sends,
    waits through outages, its metrics port."""

    batch_size: int = Field(16, ge=1, description="Posts per infer task.")
    claim_ttl_s: int = Field(
        60,
        gt=0,
        description="How long a scraper's claim on a post lasts without its heartbeat (every third of it): what a "
        "post a scraper died holding waits before another takes it, and a pushed entry before another takes it over.",
    )
    scraper_id: str | None = Field(
        None,
        description="The scraper's name in its claims and on the ingest stream, the same across restarts, so a "
        "restarted scraper takes back at once what it held (default: host name + data dir; a second process on the "
        "same one gets .1, .2, ...). Set by hand, one per host: two hosts given the same one would share claims.",
    )
    outage_max_wait_s: float = Field(
        5.0, gt=0, description="The longest wait between two tries while Redis or the blob store is unavailable."
    )
    ingest_block_s: float = Field(
        1.0,
        gt=0,
        le=5,
        description="How long one read of the ingest stream waits for a pushed post (then reads again; a stop waits "
        "for it, hence the bound).",
    )
    ingest_max_delay_s: float = Field(
        0.05, ge=0, description="How long a pushed post may wait for others to share its batch (a queue delay)."
    )
    ingest_batches_in_flight: int = Field(4, ge=1, description="Batches of pushed posts handled at once.")
    scraper_metrics_port: int | None = Field(None, description="Serve the scraper's Prometheus metrics here.")


class ImageSettings(BaseModel):
    """Image decoding, the same in workers, API uploads and training: size limits against decompression bombs,
    the decode size, the JPEG decoder and its threads."""

    max_image_pixels: int = Field(40_000_000, gt=0, description="Larger images are rejected (decompression bombs).")
    decode_long_side: int = Field(640, ge=64, description="Images are decoded down to this long side at most.")
    max_decode_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Images whose decode would hold more memory than this are rejected (too_costly), estimated from "
        "the header by format and bit depth (a WebP holds 16 bytes a pixel, a palette PNG 1).",
    )
    jpeg_decoder: Literal["auto", "pil", "torchvision"] = Field(
        "auto", description="auto: torchvision.io (nvJPEG) when the models run on CUDA, else PIL with DCT scaling."
    )
    decode_threads: int = Field(2, ge=1)


class ModelSettings(BaseModel):
    """The embedding model: backbone, weights and their input scaling, input size, forward-pass batch, device."""

    backbone: Literal["mobilenet_v2", "resnet50", "efficientnet_b0"] = "mobilenet_v2"
    weights: str = Field(
        "auto",
        description="'imagenet' (torchvision cache, error if missing), 'none' (random), a .pth path, "
        "or 'auto' (imagenet when cached, else random with a warning).",
    )
    weights_normalization: Literal["imagenet", "inception"] = Field(
        "imagenet", description="Input scaling the weights were trained with: ImageNet mean/std or [-1, 1]."
    )
    image_size: int = Field(224, ge=32)
    micro_batch: int = Field(
        0, ge=0, description="Images per forward pass; 0 = 16 on CPU (fastest measured here), 128 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FaceSettings(BaseModel):
    """The face filter: what a post without a face becomes, the detector and its thresholds."""

    face_policy: FacePolicy = "tag"
    face_detector: Literal["auto", "haar", "yunet", "mtcnn"] = Field(
        "auto",
        description="auto: MTCNN on CUDA if facenet-pytorch is there, else YuNet if its file is set or fetched "
        "(deeptarget models fetch yunet), else Haar.",
    )
    face_model_path: Path | None = Field(
        None,
        description="YuNet .onnx file (face_detection_yunet_2023mar.onnx); unset: the fetched one in model_cache_dir "
        "when it is there and passes its SHA-256 check.",
    )
    face_min_size: int = Field(24, ge=8)
    face_min_confidence: float = Field(0.0, ge=0, le=1)
    face_long_side: int = Field(448, ge=64, description="Faces are searched on a copy downscaled to this long side.")


class WorkerSettings(BaseModel):
    """Celery workers: pool size and threads, visibility and redelivery, retries and their backoff, metrics."""

    torch_threads: int = Field(0, ge=0, description="0 = the cores divided among the worker's pool processes.")
    visibility_timeout_s: int = Field(
        300,
        gt=0,
        description="A task a dead worker held comes back after this (plus redelivery_check_s); above the longest "
        "task, or that task runs twice (they are idempotent: only time is lost). docker-compose.yml gives workers a "
        "shorter stop grace.",
    )
    redelivery_check_s: float = Field(
        5.0, gt=0, description="How often each worker looks for tasks held past the visibility timeout."
    )
    worker_concurrency: int = Field(1, ge=1)
    task_max_retries: int = Field(8, ge=0, description="Retries of a transiently failing task before its dead letter.")
    task_retry_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles each time, with jitter.")
    task_retry_backoff_max_s: float = Field(
        300.0, gt=0, description="The longest retry delay (and at most half the visibility timeout)."
    )
    task_retry_disk_backoff_s: float = Field(
        20.0, gt=0, description="First retry delay after a transient disk error (full, EIO); doubles each time."
    )
    task_write_retry_s: float = Field(
        60.0, ge=0, description="An infer task retries its store write in place this long before the task retries "
        "(which embeds the batch again).",
    )  # fmt: skip
    worker_metrics_port: int | None = Field(
        None, description="Serve a worker's Prometheus metrics (summed over its pool processes) here."
    )


class IndexSettings(BaseModel):
    """The FAISS index and its single writer: snapshot publishing, catching up on unindexed posts, exact or IVF."""

    snapshot_every_adds: int = Field(1000, ge=1, description="This many index changes are published at once.")
    snapshot_every_s: float = Field(
        0.5,
        ge=0,
        description="New vectors are published (a snapshot the API loads) at most this long after they are added, "
        "coalescing the adds in between; 0 = a snapshot after every add. Stretched when snapshots get slow.",
    )
    snapshots_kept: int = Field(3, ge=1)
    index_catch_up_every_s: float = Field(
        5.0, gt=0, description="The index writer looks this often for stored posts no index task brought."
    )
    index_catch_up_after_s: float = Field(
        30.0, ge=0, description="A post stored this long ago and not indexed yet is indexed by the writer itself."
    )
    index_ivf_from: int = Field(20_000, ge=1000, description="Exact search below this many vectors, IVF from here on.")
    index_target_recall: float = Field(0.95, gt=0, le=1, description="IVF nprobe is tuned to this recall@10.")
    index_regrow_factor: float = Field(4.0, gt=1, description="IVF is rebuilt after growing this many times.")
    index_memory_budget: ByteSize = Field(
        ByteSize(8 * 2**30), description="Memory the index may take (bytes, or e.g. '8GiB'): an IVF stores floats "
        "while they fit, else the finest scalar quantizer that does (SQ8, SQ6, SQ4; see index.builder).",
    )  # fmt: skip
    index_seal_every_s: float = Field(
        60.0, gt=0, description="With Redis, readers follow each index change through a stream; the writer seals the "
        "changes into a new base snapshot this often (and the stream is trimmed behind it).",
    )  # fmt: skip
    index_seal_every_changes: int = Field(
        50_000, ge=1, description="A new base is sealed after this many changes, sooner than index_seal_every_s: "
        "the delta each reader holds and searches stays this small (and the stream, at 5 KB a 1280-d change).",
    )  # fmt: skip


class HashtagModelSettings(BaseModel):
    """The implicit-ALS hashtag model: its hyper-parameters, the hashtags it ignores, how often beat refits it."""

    als_factors: int = Field(32, ge=2)
    als_iterations: int = Field(20, ge=1)
    als_regularization: float = Field(0.05, ge=0)
    als_alpha: float = Field(20.0, gt=0, description="Confidence scale of an (image, hashtag) pair.")
    als_weighting: Literal["constant", "bm25", "tfidf"] = Field(
        "constant", description="Per-pair confidence weighting (bm25 discounts hashtags that are on everything)."
    )
    als_neighbours: int = Field(10, ge=1, description="FAISS neighbours whose ALS factors describe a new image.")
    stop_hashtags: list[str] = Field(default_factory=list)
    train_every_s: float = Field(3600.0, gt=0, description="Celery beat refits the hashtag model this often.")

    @field_validator("stop_hashtags")
    @classmethod
    def _normalise_stop_hashtags(cls, tags: list[str]) -> list[str]:
        return _normalised_hashtags(tags)


class ProfileSettings(BaseModel):
    """Per-user interest profiles and the accounts whose follower counts are outliers."""

    profile_half_life_days: float = Field(30.0, gt=0)
    follower_outlier_k: float = Field(3.0, gt=0, description="Accounts outside median +- k*MAD followers are marked.")


class ApiSettings(BaseModel):
    """The query API: address, write key, request limits and timeouts, upload decoding, what /healthz calls
    stale."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(8800, ge=0, le=65535)
    api_key: SecretStr | None = Field(
        None,
        description="The key write endpoints need (X-API-Key); unset, empty or blank: write endpoints are closed. "
        "`deeptarget serve` refuses one shorter than 16 bytes.",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0)
    api_header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send a request's headers within this long of opening (or of its "
        "previous answer); idle keep-alive connections close after it too.",
    )  # fmt: skip
    api_body_timeout_s: float = Field(30.0, gt=0, description="A request body must arrive whole this fast (else 408).")
    api_max_connections_per_client: int = Field(
        32, ge=1, description="Connections one client address may hold open; one more is answered 503 and closed."
    )
    api_max_ingest_records: int = Field(10_000, ge=1, description="Records one POST /ingest may carry (more: 413).")
    api_decode_concurrency: int = Field(
        0, ge=0, description="Uploaded images decoded and embedded at once; 0 = max(2, cores)."
    )
    api_decode_wait_s: float = Field(
        2.0, ge=0, description="How long an upload waits for a decode slot before a 503 with Retry-After."
    )
    health_writer_stale_s: float = Field(
        30.0, gt=0, description="/healthz calls the index writer dead when its heartbeat is older than this."
    )
    health_backlog_stale_s: float = Field(
        120.0, gt=0, description="/healthz calls the index stale when a stored post waits longer than this."
    )
    health_min_free_bytes: int = Field(
        512 * 1024 * 1024, ge=0, description="/healthz reports the data volume as low below this much free space."
    )
    ui_enabled: bool = Field(True, description="Serve the web UI (pages and thumbnails) under / on the API's port.")
    ui_key: SecretStr | None = Field(
        None,
        description="When set, the web UI and its thumbnails need this key (typed once on /ui/login, then kept in a "
        "cookie): set it wherever people who should not see scraped images can reach the API. Unset, empty or "
        "blank: the UI is open, as the API's read endpoints are.",
    )

    @field_validator("api_key", "ui_key")
    @classmethod
    def _blank_key_is_no_key(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty key (compose's ${DEEPTARGET_API_KEY:-}) compared equal to an empty header and opened every write
        # endpoint: blank means none.
        return key if key is not None and key.get_secret_value().strip() else None


class SandboxSettings(BaseModel):
    """The built-in sandbox social network: its seed and size."""

    sandbox_seed: int = 7
    sandbox_posts: int = Field(300, ge=1)
    sandbox_users: int = Field(30, ge=1)
    sandbox_hashtags: int = Field(10, ge=1, le=10)


# pydantic collects fields from the last base first: the groups are listed last first, so that model_fields (and
# model_dump, to_env) follow this file, StorageSettings' fields first.
class Settings(
    SandboxSettings,
    ApiSettings,
    ProfileSettings,
    HashtagModelSettings,
    IndexSettings,
    WorkerSettings,
    FaceSettings,
    ModelSettings,
    ImageSettings,
    ScraperSettings,
    FetchSettings,
    BudgetSettings,
    SourceSettings,
    StorageSettings,
    BaseSettings,
):
    """Every setting, flat: one group per subsystem (the mixins above), read by pydantic-settings."""

    # hide_input_in_errors: an error names the setting, never its value (a mistyped key may hold a secret; issue 12, L4)
    model_config = SettingsConfigDict(
        env_prefix="DEEPTARGET_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments, then DEEPTARGET_* variables, then the TOML file, then the defaults (no .env, no secrets
        # dir). The file: the one Settings.load is loading in this thread, else DEEPTARGET_CONFIG's.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _load_toml_file.get() or os.environ.get(CONFIG_ENV)
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, optionally on top of a TOML file (``path`` wins over ``DEEPTARGET_CONFIG``;
        neither the environment nor any other thread sees it). Raises ``ConfigurationError`` naming each setting that
        is wrong and why, never a value (``settings_error``)."""
        if path is None:
            return _checked(cls, None, overrides)
        if not path.is_file():
            raise FileNotFoundError(f"settings file {path} does not exist")
        token = _load_toml_file.set(path)
        try:
            return _checked(cls, path, overrides)
        finally:
            _load_toml_file.reset(token)

    def to_env(self) -> dict[str, str]:
        """The settings as DEEPTARGET_* variables, to hand to child processes (secrets included, never logged)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            raw = getattr(self, name)
            if isinstance(raw, SecretStr):
                value = raw.get_secret_value()
            elif isinstance(raw, list) and raw and isinstance(raw[0], SecretStr):
                value = [s.get_secret_value() for s in raw]
            elif isinstance(raw, dict) and any(isinstance(v, list) and v and isinstance(v[0], SecretStr)
                                               for v in raw.values()):  # fmt: skip
                value = {k: [s.get_secret_value() for s in v] for k, v in raw.items()}
            env[f"DEEPTARGET_{name.upper()}"] = value if isinstance(value, str) else _json(value)
        return env


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _checked(cls: type[Settings], path: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return cls(**overrides)
    except (ValidationError, SettingsError, tomllib.TOMLDecodeError) as err:
        raise settings_error(err, path) from None  # not chained: the original may carry the input


def settings_error(err: Exception, path: Path | None) -> ConfigurationError:
    """What is wrong with the settings, each setting named, no value shown (a mistyped key may hold a secret)."""
    where = f"{path} or the DEEPTARGET_* variables" if path else "the DEEPTARGET_* variables"
    if isinstance(err, tomllib.TOMLDecodeError):
        return ConfigurationError(f"settings file {path} is not TOML: {str(err).splitlines()[0][:200]}")
    if isinstance(err, SettingsError):  # a variable that is no JSON where JSON is wanted; its message names the field
        return ConfigurationError(f"settings in {where}: {str(err).splitlines()[0][:200]}")
    assert isinstance(err, ValidationError)
    problems = []
    for error in err.errors(include_url=False, include_input=False, include_context=False):
        name = ".".join(str(part) for part in error["loc"])[:80] or "settings"
        message = "not a setting (misspelt? every setting is in deeptarget/core/settings.py)"
        if error["type"] != "extra_forbidden":
            message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {message}")
    return ConfigurationError(f"settings in {where} are not valid: " + "; ".join(problems))


DATABASE_SCHEMES = ("postgresql", "postgres")
REDIS_SCHEMES = ("redis", "rediss", "unix")
_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _split_scheme(location: str) -> tuple[str, str]:
    """(``scheme://``, the rest) of a URL, ``scheme:`` too when the slashes are missing; ("", location) for a path."""
    match = _SCHEME.match(location)
    if not match or len(match.group(1)) == 1:  # "C:..." is a Windows drive
        return "", location
    end = match.end()
    while location[end : end + 1] == "/":
        end += 1
    return location[:end], location[end:]


def without_password(location: str) -> str:
    """A database or Redis URL (or a path) fit for logs and errors: its password, if any, replaced by ***. Never
    raises: a malformed URL is just what an error shows. Rather too much left out than too little: the user info
    ends at the last '@' (a password may hold an unencoded '@', '/' or '?')."""
    prefix, rest = _split_scheme(location)
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
        elif not prefix.endswith("//"):  # no "scheme://": in "user:secret@host" what looks like a scheme is the user
            rest = f"***{rest[at:]}"
    return prefix + _PASSWORD_PARAM.sub(lambda m: m.group(1) + "***", rest)


def passwords_in(location: str) -> list[str]:
    """The secrets a URL holds (its password, a password= parameter), as written and decoded: what an error that
    echoes a part of the URL must not show."""
    prefix, rest = _split_scheme(location)
    found = []
    if (at := rest.rfind("@")) >= 0:
        user, colon, password = rest[:at].partition(":")
        found.append(password if colon or prefix.endswith("//") else user)
    found += [m.group(0).partition("=")[2] for m in _PASSWORD_PARAM.finditer(rest)]
    found += [piece for secret in found for piece in re.split(r"[/?#@:]", secret)]  # what a parser may cut it into
    return list(dict.fromkeys(p for secret in found if secret for p in (secret, unquote(secret))))


def redacted(message: str, location: str) -> str:
    """``message`` with ``location`` and every secret in it replaced (``without_password``, ``passwords_in``)."""
    message = message.replace(location, without_password(location))
    for secret in sorted(passwords_in(location), key=len, reverse=True):
        if len(secret) >= 3:  # shorter, and *** would replace letters of every word
            message = message.replace(secret, "***")
    return message


def url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """What keeps a URL from being used, said without any part of it but the scheme; None when it looks usable."""
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        return "spaces or control characters in the URL"
    match = _SCHEME.match(url)
    if not match or not url[match.end() :].startswith("//"):
        return f"not a URL: {' or '.join(s + '://...' for s in schemes)} is wanted"
    scheme = match.group(1).lower()
    if scheme not in schemes:
        shown = repr(scheme) if len(scheme) <= 20 else "that is no"
        return f"unknown scheme {shown}: {' or '.join(s + '://' for s in schemes)} is wanted"
    if _BAD_PERCENT.search(url):
        return "a '%' that is no percent-encoding (%XX): write a '%' in a password as %25"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL (a '[' without its ']'?)"
    if "@" in url[url.index("//") + 2 + len(parts.netloc) :]:
        return "an '@' after the host: a '/', '?', '#' or '@' in the user name or password must be percent-encoded"
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if scheme in DATABASE_SCHEMES else [hosts]:  # libpq takes host1:port1,host2:port2
        try:
            urlsplit(f"//{host}").port  # noqa: B018  (raises on a port that is no number from 0 to 65535)
        except ValueError:
            return "the port is no number from 0 to 65535 (or a '[' without its ']')"
    if scheme in ("redis", "rediss") and not parts.hostname:
        return "the URL has no host"
    return None


def database_url_problem(location: str) -> str | None:
    """What keeps ``database_url`` from being used: a ``postgresql://`` URL, or a SQLite file's path (never a URL of
    another scheme, which would be taken for a path)."""
    match = _SCHEME.match(location)
    if "://" in location or (match and len(match.group(1)) > 1):  # "C:..." is a Windows drive, not a scheme
        return url_problem(location, DATABASE_SCHEMES)
    return None
