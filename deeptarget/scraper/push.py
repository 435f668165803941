"""Push ingestion: partners hand over posts as JSON lines (``deeptarget enqueue FILE``, ``POST /ingest``).

Every record is validated on its own: a bad one is reported with its line number and reason and the good ones go on.
A pushed record is a ``PushedPost``: the fields a crawled post has, nothing else (an unknown field is rejected and
named, with where it belongs when it is an owner's field given at top level), each bounded so that hostile input
stops at the door. Its hashtags are normalised as crawled posts' are; without any, they come from the caption (the
same ``hashtags_in`` the crawler uses). Valid posts become ``Post`` records and wait on a Redis stream
(``deeptarget:ingest``, durable with AOF); the scraper drains it through the same path as crawled posts (dedup,
download with limits, the infer queue), acknowledging each entry only once its post is on the queue, so a scraper
that dies mid-way leaves its entries pending for the next one to take over.

Bounds (the reasons name the field and the bound):

- a record is one line of at most ``MAX_LINE_BYTES`` (64 KiB) of UTF-8 JSON: an object, no field given twice, no
  NaN/Infinity;
- ``id`` (and ``owner.id``): a string of 1 to ``MAX_ID_CHARS`` letters, digits and ``_ . : -``, starting with a letter
  or digit, so it is usable as a URL path segment (``DELETE /posts/{id}``, ``GET /users/{id}``) and a key;
- ``caption``: at most ``MAX_CAPTION_CHARS`` (2,200) characters, Instagram's limit for a caption, no control
  characters but tab and line breaks;
- ``hashtags``: at most ``MAX_HASHTAGS`` (30), Instagram's limit per post; each, once normalised, letters, digits and
  ``_`` (what a ``#tag`` in a caption can be), at most ``MAX_HASHTAG_CHARS``;
- ``media_url`` (required): an http(s) URL, and ``permalink``: an https URL (a link for people to open, never
  ``javascript:``, ``data:`` or relative); each absolute with a host, no ``user:password@``, no spaces, backslashes,
  control or invisible formatting characters (bidi controls, zero-width), at most ``MAX_URL_CHARS`` (2 KiB). Which
  hosts may be fetched is the downloader's business;
- ``like_count``, ``comments_count``, ``owner.followers_count``: whole numbers from 0 to 2^63-1 (int64), not booleans;
- ``timestamp``: an ISO 8601 string (Graph's ``2024-05-01T12:00:00+0000`` too), from ``EARLIEST_TIMESTAMP`` to a day
  ahead of now; one without an offset is taken as UTC, and every timestamp is stored in UTC;
- ``owner.username``: 1 to 30 letters, digits, periods and underscores (Instagram's rule for usernames).

The record has no ``source``: the server names it (``push``, or ``feed`` for a partner feed), so a pushed post can never
pass for a crawled one. Who may overwrite what is the store's rule (store/posts.py): a pushed record never rewrites a
post a crawl stored, and the first record of an id wins over later pushes of it.

The Instagram limits (2,200 characters and 30 hashtags per caption, 30-character usernames) are the ones Instagram's
apps enforce, as publishers document them, e.g. https://ayrshare.com/apis/post/social-networks/instagram ("up to 30
hashtags", "Maximum 2,200 post characters") and https://bulkpublish.com/blog/instagram-character-limit/ (the same,
and "Username | 30 characters").
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from redis.typing import StreamIdT

from deeptarget.core import keys
from deeptarget.core.records import PUSHED_SOURCES, Owner, Post, hashtags_in, normalise_hashtag

LOG = logging.getLogger(__name__)

GROUP = "scrapers"
MAX_DELIVERIES = 5  # a pushed entry taken this many times without an ack is a poison pill: dead letters
MAX_LINE_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_CAPTION_CHARS = 2200  # Instagram's limit for a caption
MAX_HASHTAGS = 30  # Instagram's limit per post
MAX_HASHTAG_CHARS = 100  # no documented limit; generous, and far above any real tag
MAX_URL_CHARS = 2048
MAX_USERNAME_CHARS = 30  # Instagram's limit for a username
INT64_MAX = 2**63 - 1
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)  # before any social network's first post
FUTURE_SKEW = timedelta(days=1)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
USERNAME_PATTERN = r"^[A-Za-z0-9._]+$"
PushedSource = Literal["push", "feed"]  # what the server calls a pushed record's source (schema.PUSHED_SOURCES)

_ID_RE = re.compile(ID_PATTERN)
_USERNAME_RE = re.compile(USERNAME_PATTERN)
_HASHTAG_WORD_RE = re.compile(r"\w+")
_OWNER_SHAPE = '{"id": ..., "username": ..., "followers_count": ...}'
_OWNER_EXAMPLE = f'"owner": {_OWNER_SHAPE}'
# An owner's fields given at top level: where each belongs.
OWNER_FIELD_HINTS = {
    "username": "owner.username",
    "owner_username": "owner.username",
    "followers_count": "owner.followers_count",
    "owner_followers_count": "owner.followers_count",
    "owner_id": "owner.id",
    "user_id": "owner.id",
}
_MEDIA_URL_REQUIRED = "required: the http(s) URL of the image"
_LISTED_NAMES = 10  # unknown field names named in a reason; the rest are counted


@dataclass(frozen=True)
class BadRecord:
    line: int  # 1-based
    reason: str


def _reject(message: str) -> PydanticCustomError:
    return PydanticCustomError("pushed_post", message)


def _bad_text(value: str, allowed: str = "") -> str | None:
    """Why a string can't be stored as it is (a control or lone surrogate character), or None."""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            return "not valid Unicode (a lone surrogate)"
        if category == "Cc" and char not in allowed:
            return "control characters are not allowed" + (" (tab and line breaks are)" if allowed else "")
    return None


def _check_id(value: Any) -> Any:
    if value is None:
        raise _reject("required")
    if not isinstance(value, str):
        raise _reject(
            'must be a string (a number may have lost digits on the way: send "17895695668004550", '
            "not 17895695668004550)"
        )
    if not value:
        raise _reject("empty")
    if problem := _bad_text(value):
        raise _reject(problem)
    if len(value) > MAX_ID_CHARS:
        raise _reject(f"longer than {MAX_ID_CHARS} characters")
    if not _ID_RE.fullmatch(value):
        raise _reject("can't be a post id: letters, digits and _ . : - only, starting with a letter or digit")
    return value


def _check_count(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise _reject(f"must be a whole number from 0 to {INT64_MAX}")
    return value


def _check_url(value: Any, what: str, schemes: tuple[str, ...] = ("http", "https")) -> Any:
    if value is None:
        return value
    if not isinstance(value, str):
        raise _reject(f"must be a string: {what}")
    if len(value) > MAX_URL_CHARS:
        raise _reject(f"longer than {MAX_URL_CHARS} characters")
    if problem := _bad_text(value):
        raise _reject(problem)
    if any(char.isspace() or char == "\\" for char in value):
        raise _reject("spaces and backslashes are not allowed in the URL (percent-encode them)")
    if any(unicodedata.category(char) == "Cf" for char in value):  # bidi overrides, zero-width: a link that lies
        raise _reject("invisible formatting characters (bidi controls, zero-width) are not allowed in the URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (a port that is no number raises here)
    except ValueError as err:
        raise _reject(f"not a URL ({err})") from None
    if parts.scheme.lower() not in schemes:
        raise _reject(f"{what} is required")
    if not parts.hostname:
        raise _reject("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise _reject("no user:password@ in the URL (credentials do not belong in a post)")
    return value


def _check_timestamp(value: Any) -> Any:
    if value is None:
        return value
    example = "ISO 8601, e.g. 2024-05-01T12:00:00Z"
    if not isinstance(value, str):
        raise _reject(f"a date and time as a string ({example})")
    when = None
    if len(value) <= 64:
        for parse in (lambda v: datetime.strptime(v, "%Y-%m-%dT%H:%M:%S%z"), datetime.fromisoformat):
            try:
                when = parse(value)
                break
            except ValueError:
                continue
    if when is None:
        raise _reject(f"not a date and time ({example})")
    try:
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:  # an offset that carries it past year 9999 (or before year 1)
        raise _reject(f"not a date and time ({example})") from None
    if when < EARLIEST_TIMESTAMP:
        raise _reject(f"before {EARLIEST_TIMESTAMP.date().isoformat()}: not the time of a post")
    if when > datetime.now(UTC) + FUTURE_SKEW:
        raise _reject("more than a day in the future")
    return when


def _check_hashtag(value: Any) -> Any:
    if not isinstance(value, str):
        raise _reject("must be a string")
    if len(value) > 4 * MAX_HASHTAG_CHARS:  # before NFKC, which can only grow it so much
        raise _reject(f"longer than {MAX_HASHTAG_CHARS} characters")
    if problem := _bad_text(value):
        raise _reject(problem)
    tag = normalise_hashtag(value)
    if len(tag) > MAX_HASHTAG_CHARS:
        raise _reject(f"longer than {MAX_HASHTAG_CHARS} characters")
    if not _HASHTAG_WORD_RE.fullmatch(tag):
        raise _reject("not a hashtag: letters, digits and _ only (an optional leading #)")
    return tag


def _list_or_null(schema: dict[str, Any]) -> None:
    """The document says what the validator takes: null as well as a list (null is no hashtags)."""
    schema["anyOf"] = [{"type": schema.pop("type"), "items": schema.pop("items")}, {"type": "null"}]


Hashtag = Annotated[
    str,
    BeforeValidator(_check_hashtag),
    Field(min_length=1, max_length=MAX_HASHTAG_CHARS, description="normalised: NFKC, casefolded, no leading #"),
]


class PushedOwner(BaseModel):
    """The account that posted. Only these fields; any other is rejected."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN, description="the account's id")
    username: str | None = Field(
        None, min_length=1, max_length=MAX_USERNAME_CHARS, pattern=USERNAME_PATTERN, description="the account's handle"
    )
    followers_count: int | None = Field(None, ge=0, le=INT64_MAX)

    _id = field_validator("id", mode="before")(_check_id)
    _count = field_validator("followers_count", mode="before")(_check_count)

    @field_validator("username", mode="before")
    @classmethod
    def _username(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_USERNAME_CHARS or not _USERNAME_RE.fullmatch(value):
            raise _reject(
                f"1 to {MAX_USERNAME_CHARS} letters, digits, periods and underscores (Instagram's rule for usernames)"
            )
        return value


class PushedPost(BaseModel):
    """A post as a partner pushes it (one JSON object; ``POST /ingest``, ``deeptarget enqueue``, partner feeds).

    Only these fields; any other is rejected and named. Without ``hashtags`` (missing, null or empty) they are the
    caption's ``#tags``; given, they are normalised and kept."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1,
        max_length=MAX_ID_CHARS,
        pattern=ID_PATTERN,
        description="the post's id at its source (a string: letters, digits and _ . : -)",
    )
    media_url: str = Field(
        max_length=MAX_URL_CHARS,
        description="http(s) URL of the image, with a host and no user:password@ (the scraper fetches it, within its "
        "host and size limits)",
        json_schema_extra={"format": "uri"},
    )
    permalink: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="https URL of the post, with a host and no user:password@",
        json_schema_extra={"format": "uri"},
    )
    caption: str | None = Field(
        None,
        max_length=MAX_CAPTION_CHARS,
        description="at most 2,200 characters (Instagram's limit); no control characters but tab and line breaks",
    )
    hashtags: list[Hashtag] = Field(
        default_factory=list,
        max_length=MAX_HASHTAGS,
        description="at most 30 (Instagram's limit per post), each letters, digits and _ (a leading # is dropped); "
        "without any, the caption's #tags",
        json_schema_extra=_list_or_null,
    )
    like_count: int | None = Field(None, ge=0, le=INT64_MAX)
    comments_count: int | None = Field(None, ge=0, le=INT64_MAX)
    timestamp: datetime | None = Field(
        None, description="ISO 8601; without an offset, UTC. From 2000-01-01 to a day ahead of now."
    )
    owner: PushedOwner | None = None

    _id = field_validator("id", mode="before")(_check_id)
    _counts = field_validator("like_count", "comments_count", mode="before")(_check_count)
    _timestamp = field_validator("timestamp", mode="before")(_check_timestamp)

    @field_validator("media_url", mode="before")
    @classmethod
    def _media_url(cls, value: Any) -> Any:
        if value is None:
            raise _reject(_MEDIA_URL_REQUIRED)
        return _check_url(value, "an http(s) URL of the image")

    @field_validator("permalink", mode="before")
    @classmethod
    def _permalink(cls, value: Any) -> Any:
        return _check_url(value, "an https URL of the post", schemes=("https",))

    @field_validator("caption", mode="before")
    @classmethod
    def _caption(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str):
            raise _reject("must be a string")
        if len(value) > MAX_CAPTION_CHARS:
            raise _reject(f"longer than {MAX_CAPTION_CHARS} characters (Instagram's limit for a caption)")
        if problem := _bad_text(value, allowed="\t\n\r"):
            raise _reject(problem)
        return value

    @field_validator("hashtags", mode="before")
    @classmethod
    def _hashtags(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _reject("must be a list of strings")
        if len(value) > MAX_HASHTAGS:
            raise _reject(f"more than {MAX_HASHTAGS} (Instagram's limit per post)")
        return value

    @field_validator("owner", mode="before")
    @classmethod
    def _owner(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise _reject(f"must be an object: {_OWNER_SHAPE}")
        return value

    @model_validator(mode="after")
    def _fill_hashtags(self) -> PushedPost:
        if self.hashtags:
            self.hashtags = list(dict.fromkeys(self.hashtags))
            return self
        tags = hashtags_in(self.caption)
        if len(tags) > MAX_HASHTAGS:
            raise _reject(f"caption: more than {MAX_HASHTAGS} hashtags (Instagram's limit per post)")
        self.hashtags = tags
        return self

    def to_post(self, source: PushedSource = "push") -> Post:
        if source not in PUSHED_SOURCES:  # a pushed record must never pass for a crawled one (issue 12, L8)
            raise ValueError(f"a pushed record's source is one of {sorted(PUSHED_SOURCES)}, not {source!r}")
        owner = self.owner
        return Post(
            id=self.id,
            source=source,
            media_url=self.media_url,
            permalink=self.permalink,
            caption=self.caption,
            hashtags=self.hashtags,
            like_count=self.like_count,
            comments_count=self.comments_count,
            timestamp=self.timestamp,
            owner=None if owner is None else Owner(**owner.model_dump()),
        )


POST_FIELDS = tuple(PushedPost.model_fields)
OWNER_FIELDS = tuple(PushedOwner.model_fields)


class _Rejected(ValueError):
    """A line that is no record, with the reason."""


def _shown(name: object) -> str:
    """A field name as a reason shows it: as it is when plain, else JSON-quoted (ASCII), at most 40 characters."""
    text = str(name)
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", text):
        return text
    return json.dumps(text[:40] + ("..." if len(text) > 40 else ""))


def _names(names: Sequence[object]) -> str:
    shown = ", ".join(_shown(n) for n in names[:_LISTED_NAMES])
    return shown + (f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else "")


def unknown_fields_reason(names: Sequence[object]) -> str:
    """``unknown field(s): ...``, saying where an owner's field given at top level belongs."""
    reason = f"unknown field(s): {_names(names)}"
    hints = [f"{n} goes in {OWNER_FIELD_HINTS[n]}" for n in names if isinstance(n, str) and n in OWNER_FIELD_HINTS]
    if hints:
        reason += f"; the owner goes in {_OWNER_EXAMPLE} ({', '.join(hints[:_LISTED_NAMES])})"
    if len(hints) < len(names):
        reason += f"; a record has {', '.join(POST_FIELDS)}"
    return reason


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(err: ValidationError) -> str:
    """One readable reason for all that is wrong with a record: unknown fields first, then each field's problem."""
    errors = err.errors(include_url=False, include_input=False)
    unknown = [e["loc"][0] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    owner_unknown = [
        e["loc"][1] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 2 and e["loc"][0] == "owner"
    ]
    parts = []
    if unknown:
        parts.append(unknown_fields_reason(unknown))
    if owner_unknown:
        parts.append(f"owner: unknown field(s): {_names(owner_unknown)}; an owner has {', '.join(OWNER_FIELDS)}")
    for e in errors:
        if e["type"] == "extra_forbidden":
            continue
        message = "required" if e["type"] == "missing" else e["msg"]
        if e["type"] == "missing" and e["loc"] == ("media_url",):
            message = _MEDIA_URL_REQUIRED
        parts.append(f"{_where(e['loc'])}: {message}" if e["loc"] else message)
    return "; ".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _Rejected(f"field given twice: {_shown(key)}")
        record[key] = value
    return record


def _no_constant(name: str) -> Any:
    raise _Rejected(f"not JSON: {name} is not a JSON number")


def _record(raw: str | bytes, first: bool) -> dict[str, Any] | None:
    """The JSON object on one line; None for a blank line. Raises ``_Rejected`` with the reason."""
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\r\n")
        if len(raw) > MAX_LINE_BYTES:
            raise _Rejected(f"record longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Rejected(f"not UTF-8 text (byte {err.start + 1})") from None
    else:
        text = raw.rstrip("\r\n")
        if len(text) > MAX_LINE_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
            raise _Rejected(f"record longer than {MAX_LINE_BYTES} bytes")
    if first:
        text = text.removeprefix("\ufeff")  # a byte order mark at the start of a file
    if not text.strip():
        return None
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise _Rejected(f"not JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise _Rejected("not JSON: nested too deeply") from None
    except _Rejected:
        raise
    except ValueError as err:  # an integer of more digits than Python converts ("Exceeds the limit (4300 digits)...")
        raise _Rejected(f"not JSON: {str(err).split(':')[0]}") from None
    if not isinstance(record, dict):
        raise _Rejected(f"expected a JSON object, got {type(record).__name__}")
    return record


def body_records(body: bytes) -> Sequence[str | bytes]:
    """The records of a request body, for ``parse_posts``: a JSON array's elements (as their text, so each is checked
    as a line is), one JSON object (pretty-printed or not), or else the body's lines. Raises ``ValueError`` with the
    reason when the body is an array that is no JSON."""
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return body.splitlines()  # each line says for itself whether it is UTF-8
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        records: list[str | bytes] = []
        at = _skip_space(text, start + 1)
        try:
            if text.startswith("]", at):
                at += 1
            else:
                while True:
                    _, end = decoder.raw_decode(text, at)
                    records.append(text[at:end])
                    at = _skip_space(text, end)
                    if text.startswith("]", at):
                        at += 1
                        break
                    if not text.startswith(",", at):
                        raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
                    at = _skip_space(text, at + 1)
        except json.JSONDecodeError as err:
            raise ValueError(f"body is not a JSON array: {err.msg} at line {err.lineno} column {err.colno}") from None
        except RecursionError:
            raise ValueError("body is not a JSON array: nested too deeply") from None
        if text[at:].strip():
            raise ValueError("body is not a JSON array: more after its closing ]")
        return records
    if text.startswith("{", start):
        try:
            _, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # not one object: the lines say what is wrong
            return body.splitlines()
        if not text[end:].strip():
            return [text[start:end]]
    return body.splitlines()


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def parse_posts(lines: Iterable[str | bytes], source: PushedSource = "push") -> tuple[list[Post], list[BadRecord]]:
    """Posts from JSON lines (blank lines skipped), each line a ``PushedPost``; the bad ones with their reasons. The
    posts' source is ``source`` (``push`` or ``feed``), never one a record names."""
    posts, bad = [], []
    for number, raw in enumerate(lines, 1):
        try:
            record = _record(raw, first=number == 1)
            if record is None:
                continue
            posts.append(PushedPost.model_validate(record).to_post(source))
        except _Rejected as err:
            bad.append(BadRecord(number, str(err)))
        except ValidationError as err:
            bad.append(BadRecord(number, describe(err)))
    return posts, bad


class IngestStream:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def push(self, posts: list[Post]) -> int:
        if not posts:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for post in posts:
                pipe.xadd(keys.ingest_stream, {"post": post.model_dump_json()})
            await pipe.execute()
        return len(posts)

    async def _group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.ingest_stream, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def take(
        self, consumer: str, count: int, idle_ms: int, block_ms: int | None = None
    ) -> list[tuple[str, Post]]:
        """Entries for this consumer: first ones other consumers left pending for ``idle_ms`` (they died), then new
        ones, waiting up to ``block_ms`` for one when there is none (None: no wait). An entry that is not a valid
        post (written by hand, or by another version) is dropped with a warning instead of stopping the reader."""
        await self._group()
        _, claimed, *_ = await self.redis.xautoclaim(
            keys.ingest_stream, GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=count
        )
        entries = await self._without_poison(list(claimed))
        if len(entries) < count:
            fresh = await self.redis.xreadgroup(
                GROUP,
                consumer,
                {keys.ingest_stream: ">"},
                count=count - len(entries),
                block=block_ms if block_ms and not entries else None,
            )
            entries += [entry for _, stream_entries in fresh or [] for entry in stream_entries]
        return await self._posts(entries)

    async def take_own(self, consumer: str, count: int) -> list[tuple[str, Post]]:
        """Entries still pending for ``consumer`` itself: what this scraper (same identity) took before it died or
        lost Redis, taken back at once instead of after ``idle_ms``."""
        await self._group()
        pending = await self.redis.xreadgroup(GROUP, consumer, {keys.ingest_stream: "0"}, count=count)
        entries = [entry for _, stream_entries in pending or [] for entry in stream_entries]
        return await self._posts(await self._without_poison(entries))

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Entries still being handled: their idle time starts again, so no other consumer takes them over."""
        if entry_ids:
            ids: list[StreamIdT] = list(entry_ids)  # xclaim takes a list of redis-py's id type: list[str] is not one
            await self.redis.xclaim(keys.ingest_stream, GROUP, consumer, 0, ids, justid=True)

    async def _posts(self, entries: list[Any]) -> list[tuple[str, Post]]:
        out, bad = [], []
        for entry_id, fields in entries:
            key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if not fields:  # deleted while pending
                continue
            try:
                out.append((key, Post.model_validate_json(fields[b"post"])))
            except (KeyError, ValidationError) as err:
                LOG.warning("ingest entry %s is not a post, dropped: %s", key, str(err)[:300])
                bad.append(key)
        await self.ack(bad)
        return out

    async def _without_poison(self, claimed: list[Any]) -> list[Any]:
        """Entries taken over from a consumer that never acknowledged them, less those delivered more than
        ``MAX_DELIVERIES`` times: whatever fails on them would fail again, so they go to the ingest dead letters
        (``deeptarget:ingest:dead``) with the reason, instead of coming back forever."""
        kept = []
        for entry_id, fields in claimed:
            pending = await self.redis.xpending_range(keys.ingest_stream, GROUP, entry_id, entry_id, 1)
            delivered = int(pending[0]["times_delivered"]) if pending else 0
            if delivered <= MAX_DELIVERIES or not fields:
                kept.append((entry_id, fields))
                continue
            key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            reason = f"delivered {delivered} times and never handled"
            await self.redis.xadd(keys.ingest_dead_stream, {"entry": key, "reason": reason,
                                  "post": fields.get(b"post", b"")}, maxlen=100_000, approximate=True)  # fmt: skip
            await self.ack([key])
            LOG.error("ingest entry %s %s: moved to %s", key, reason, keys.ingest_dead_stream)
        return kept

    async def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            await self.redis.xack(keys.ingest_stream, GROUP, *entry_ids)
            await self.redis.xdel(keys.ingest_stream, *entry_ids)

    async def backlog(self) -> int:
        return int(await self.redis.xlen(keys.ingest_stream))
