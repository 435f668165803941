"""Pushed posts: the ``PushedPost`` record (hashtags from the caption, unknown fields named, hostile input bounded),
``POST /ingest`` over loopback into the real Redis ingest stream, and the OpenAPI document of its body."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from deeptarget.api.app import create_app
from deeptarget.core import keys
from deeptarget.core.records import Post
from deeptarget.runtime.app_server import AppServer
from deeptarget.scraper.push import (
    MAX_CAPTION_CHARS,
    MAX_HASHTAGS,
    MAX_ID_CHARS,
    MAX_LINE_BYTES,
    MAX_URL_CHARS,
    IngestStream,
    PushedPost,
    body_records,
    parse_posts,
)
from tests.conftest import make_settings

URL = "https://cdn.example/1.jpg"
OWNER_HINT = '"owner": {"id": ..., "username": ..., "followers_count": ...}'
RECORD_FIELDS = "id, media_url, permalink, caption, hashtags, like_count, comments_count, timestamp, owner"


def line(**fields: Any) -> str:
    return json.dumps({"id": "p1", "media_url": URL, **fields})


def one(text: str) -> Post:
    posts, bad = parse_posts([text])
    assert not bad, bad
    return posts[0]


def reason(text: str | bytes) -> str:
    posts, bad = parse_posts([text])
    assert not posts and len(bad) == 1, (posts, bad)
    return bad[0].reason


def test_hashtags_come_from_the_caption_when_none_are_given() -> None:
    assert one(line(caption="lunch #Coffee #sushi")).hashtags == ["coffee", "sushi"]
    assert one(line(caption="lunch #Coffee #sushi", hashtags=[])).hashtags == ["coffee", "sushi"]
    assert one(line(caption="lunch #Coffee #sushi", hashtags=None)).hashtags == ["coffee", "sushi"]
    assert one(line(caption="no tags here")).hashtags == [] and one(line()).hashtags == []
    # given: normalised as crawled posts' are (NFKC, casefold, no '#'), repeats dropped, and the caption's ignored
    given = one(line(caption="lunch #Coffee", hashtags=["#Sushi", "sushi", "ＲＡＭＥＮ", "東京"]))
    assert given.hashtags == ["sushi", "ramen", "東京"] and given.source == "push"
    assert PushedPost.model_validate({"id": "p1", "media_url": URL, "caption": "#A #b"}).hashtags == ["a", "b"]


def test_unknown_fields_are_rejected_by_name_and_an_owners_fields_are_pointed_to_owner() -> None:
    assert reason(line(username="bob", followers_count=3)) == (
        f"unknown field(s): username, followers_count; the owner goes in {OWNER_HINT} "
        "(username goes in owner.username, followers_count goes in owner.followers_count)"
    )
    assert reason(line(owner_id="7")).endswith("(owner_id goes in owner.id)")
    assert "(user_id goes in owner.id)" in reason(line(user_id="7"))
    assert reason(line(colour="red")) == f"unknown field(s): colour; a record has {RECORD_FIELDS}"
    mixed = reason(line(colour="red", username="bob"))
    assert mixed.startswith("unknown field(s): colour, username;") and "username goes in owner.username" in mixed
    assert mixed.endswith(f"a record has {RECORD_FIELDS}")
    assert "unknown field(s): source" in reason(line(source="graph"))  # the source is ours to say
    many = reason(line(**{f"f{i}": i for i in range(25)}))
    assert "f9 and 15 more" in many and "f10" not in many
    shown = '"\\u001b[31mred' + "x" * 32 + '..."'  # quoted (ASCII, no escape sequence), cut to 40 characters
    assert reason(line(**{"\x1b[31mred" + "x" * 50: 1})).startswith(f"unknown field(s): {shown};")


def test_an_unknown_field_of_the_owner_is_rejected() -> None:
    assert reason(line(owner={"id": "9", "avatar": "x.jpg"})) == (
        "owner: unknown field(s): avatar; an owner has id, username, followers_count"
    )
    assert reason(line(owner={"username": "bob"})) == "owner.id: required"
    assert reason(line(owner="bob")) == 'owner: must be an object: {"id": ..., "username": ..., "followers_count": ...}'
    post = one(line(owner={"id": "9", "username": "bob.x_1", "followers_count": 12}))
    assert post.owner is not None and post.owner.username == "bob.x_1" and post.owner.followers_count == 12


def test_each_bad_record_is_rejected_alone_with_its_line_and_the_good_ones_go_on() -> None:
    lines = [
        line(id="a", caption="#one"),
        "",
        line(id="b", username="bob"),
        "{not json",
        line(id="c", owner={"id": "1", "karma": 3}),
        line(id="d", hashtags=["#Two"]),
    ]
    posts, bad = parse_posts(lines)
    assert [(p.id, p.hashtags) for p in posts] == [("a", ["one"]), ("d", ["two"])]
    assert [b.line for b in bad] == [3, 4, 5]
    assert "owner.username" in bad[0].reason and "not JSON" in bad[1].reason and "karma" in bad[2].reason


FUTURE = (datetime.now(UTC) + timedelta(days=3)).isoformat()
BOUNDS = [
    # id
    (line(id=""), "id: empty"),
    (line(id="a\u0000b"), "id: control characters are not allowed"),
    (line(id="a\nb"), "id: control characters are not allowed"),
    (line(id="x" * (MAX_ID_CHARS + 1)), f"id: longer than {MAX_ID_CHARS} characters"),
    (line(id="../etc"), "id: can't be a post id: letters, digits and _ . : - only, starting with a letter or digit"),
    (line(id="a/b"), "id: can't be a post id"),
    (line(id="a b"), "id: can't be a post id"),
    (line(id="post\u202e1"), "id: can't be a post id"),  # a right-to-left override
    (line(id=17895695668004550), 'id: must be a string (a number may have lost digits on the way: send "1789'),
    (json.dumps({"media_url": URL}), "id: required"),
    # caption
    (
        line(caption="x" * (MAX_CAPTION_CHARS + 1)),
        "caption: longer than 2200 characters (Instagram's limit for a caption)",
    ),
    (line(caption="bell\u0007"), "caption: control characters are not allowed (tab and line breaks are)"),
    (line(caption="nul\u0000"), "caption: control characters are not allowed"),
    (line(caption=5), "caption: must be a string"),
    (line(caption="half \ud800 a pair"), "caption: not valid Unicode"),  # json.dumps writes it as \ud800
    (line(caption=" ".join(f"#t{i}" for i in range(MAX_HASHTAGS + 1))), "caption: more than 30 hashtags"),
    # hashtags
    (line(hashtags=[f"t{i}" for i in range(MAX_HASHTAGS + 1)]), "hashtags: more than 30 (Instagram's limit per post)"),
    (line(hashtags="sushi"), "hashtags: must be a list of strings"),
    (line(hashtags=["ok", "sushi lunch"]), "hashtags[1]: not a hashtag: letters, digits and _ only"),
    (line(hashtags=["#"]), "hashtags[0]: not a hashtag"),
    (line(hashtags=[3]), "hashtags[0]: must be a string"),
    (line(hashtags=["x" * 101]), "hashtags[0]: longer than 100 characters"),
    # media_url, permalink
    (line(media_url="file:///etc/passwd"), "media_url: an http(s) URL of the image is required"),
    (line(media_url="javascript:alert(1)"), "media_url: an http(s) URL of the image is required"),
    (line(media_url="http:///1.jpg"), "media_url: the URL has no host"),
    (line(media_url="https://user:pass@cdn.example/1.jpg"), "media_url: no user:password@ in the URL"),
    (line(media_url="https://token@cdn.example/1.jpg"), "media_url: no user:password@ in the URL"),
    (line(media_url="https://cdn.example\\@evil.example/"), "media_url: spaces and backslashes are not allowed"),
    (line(media_url="https://cdn.example/a b.jpg"), "media_url: spaces and backslashes are not allowed"),
    (line(media_url="https://cdn.example:port/1.jpg"), "media_url: not a URL"),
    (
        line(media_url="https://cdn.example/" + "a" * MAX_URL_CHARS),
        f"media_url: longer than {MAX_URL_CHARS} characters",
    ),
    (line(media_url=None), "media_url: required: the http(s) URL of the image"),
    (line(media_url=5), "media_url: must be a string: an http(s) URL of the image"),
    (line(id=None), "id: required"),
    (json.dumps({"id": "p1"}), "media_url: required: the http(s) URL of the image"),
    (line(permalink="ftp://cdn.example/p/1"), "permalink: an https URL of the post is required"),
    # counts
    (line(like_count=-5), "like_count: must be a whole number from 0 to 9223372036854775807"),
    (line(like_count=2**63), "like_count: must be a whole number from 0 to 9223372036854775807"),
    (line(like_count=True), "like_count: must be a whole number"),
    (line(like_count="12"), "like_count: must be a whole number"),
    (line(comments_count=1.5), "comments_count: must be a whole number"),
    (line(owner={"id": "9", "followers_count": -1}), "owner.followers_count: must be a whole number"),
    # owner
    (line(owner={"id": "9", "username": "bad name"}), "owner.username: 1 to 30 letters, digits, periods and"),
    (line(owner={"id": "9", "username": "x" * 31}), "owner.username: 1 to 30"),
    (line(owner={"id": "9/1"}), "owner.id: can't be a post id"),
    # timestamp
    (line(timestamp="yesterday"), "timestamp: not a date and time (ISO 8601, e.g. 2024-05-01T12:00:00Z)"),
    (line(timestamp=1714564800), "timestamp: a date and time as a string"),
    (line(timestamp="1999-12-31T23:59:59Z"), "timestamp: before 2000-01-01: not the time of a post"),
    (line(timestamp=FUTURE), "timestamp: more than a day in the future"),
    (line(timestamp="9999-12-31T23:59:59-10:00"), "timestamp: not a date and time"),
    # the line itself
    ("x" * (MAX_LINE_BYTES + 1), f"record longer than {MAX_LINE_BYTES} bytes"),
    (  # bytes, not characters
        json.dumps({"id": "p1", "media_url": URL, "caption": "é" * (MAX_LINE_BYTES // 2)}, ensure_ascii=False),
        f"record longer than {MAX_LINE_BYTES} bytes",
    ),
    (b'{"id": "p1", "caption": "\xff"}', "not UTF-8 text (byte 26)"),
    (line()[:-1] + ', "id": "p2"}', "field given twice: id"),
    (line(owner={"id": "9"})[:-2] + ', "id": "8"}}', "field given twice: id"),
    (line(like_count=float("nan")), "not JSON: NaN is not a JSON number"),
    (line(like_count=float("inf")), "not JSON: Infinity is not a JSON number"),
    ("[" * 20_000, "not JSON: nested too deeply"),
    (line()[:-1] + f', "like_count": {"9" * 5000}}}', "not JSON: Exceeds the limit (4300 digits)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{not json", "not JSON: Expecting property name enclosed in double quotes at column 2"),
]


@pytest.mark.parametrize(("text", "expected"), BOUNDS, ids=[expected[:50] for _, expected in BOUNDS])
def test_hostile_input_is_rejected_at_the_door_with_a_reason(text: str | bytes, expected: str) -> None:
    assert reason(text).startswith(expected)


def test_what_is_within_the_bounds_is_accepted_as_it_comes() -> None:
    post = one(
        line(
            id="1789_5:a.b-c",
            media_url="HTTPS://cdn.example:8443/p/1.jpg?x=1",
            permalink="https://www.instagram.com/p/abc/",
            caption="tab\tand\r\nlines #ok " + "x" * (MAX_CAPTION_CHARS - 40),
            like_count=2**63 - 1,
            comments_count=0,
            owner={"id": "9", "username": "a" * 30, "followers_count": 0},
        )
    )
    assert post.hashtags == ["ok"] and post.like_count == 2**63 - 1
    graph = one(line(timestamp="2024-05-01T12:00:00+0200"))  # Graph's form, stored in UTC
    assert graph.timestamp == datetime(2024, 5, 1, 10, tzinfo=UTC) and graph.timestamp.utcoffset() == timedelta(0)
    assert one(line(timestamp="2024-05-01T12:00:00")).timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert one("\ufeff" + line()).id == "p1"  # a byte order mark opening a file
    assert one(line(hashtags=[f"t{i}" for i in range(MAX_HASHTAGS)])).hashtags[-1] == "t29"


def test_a_body_is_a_json_array_one_object_or_json_lines() -> None:
    assert body_records(b' [ {"id": "a"} , {"id": "b", "x": [1, 2]}\n]\n') == [
        '{"id": "a"}',
        '{"id": "b", "x": [1, 2]}',
    ]
    assert body_records(b"[]") == []
    pretty = b'{\n  "id": "a",\n  "media_url": "https://cdn.example/a.jpg"\n}\n'
    assert body_records(pretty) == [pretty.decode().strip()]
    assert body_records(b'{"id": "a"}\n{"id": "b"}\n') == [b'{"id": "a"}', b'{"id": "b"}']
    assert body_records(b'{"id": "a"\n{"id": "b"}') == [b'{"id": "a"', b'{"id": "b"}']
    for body, why in ((b"[{]", "body is not a JSON array: Expecting property name"), (b"[1 2]", "Expecting ','"),
                      (b"[1] [2]", "more after its closing ]"), (b"[" * 20_000, "nested too deeply")):  # fmt: skip
        with pytest.raises(ValueError, match=why.replace("[", r"\[")):
            body_records(body)
    # the records of an array are checked as lines are: a field given twice is seen, NaN too
    _, bad = parse_posts(body_records(b'[{"id": "a", "id": "b"}, {"id": "c", "media_url": NaN}]'))
    assert [b.reason for b in bad] == ["field given twice: id", "not JSON: NaN is not a JSON number"]


@pytest.fixture
async def api(tmp_path: Path, redis_url: str):
    settings = make_settings(tmp_path / "data", redis_url, api_key=SecretStr("k"))
    async with AppServer(create_app(settings)) as server, aiohttp.ClientSession() as http:
        yield server.url, http


async def ingest(api: tuple[str, aiohttp.ClientSession], body: bytes, content_type: str) -> tuple[int, dict]:
    url, http = api
    headers = {"X-API-Key": "k", "Content-Type": content_type}
    async with http.post(f"{url}/ingest", data=body, headers=headers) as response:
        return response.status, await response.json()


def streamed(client: redis.Redis) -> list[Post]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(keys.ingest_stream)  # type: ignore[assignment]
    return [Post.model_validate_json(fields[b"post"]) for _, fields in entries]


async def test_a_mixed_batch_over_http_queues_the_good_posts_with_hashtags_and_says_why_the_others_not(
    api: tuple[str, aiohttp.ClientSession], redis_url: str, redis_client: redis.Redis
) -> None:
    body = "\n".join([
        line(id="good-1", caption="lunch #Coffee #sushi", like_count=4, owner={"id": "u1", "followers_count": 8}),
        line(id="bad-1", username="bob", followers_count=10),
        "",
        line(id="good-2", hashtags=["#Ramen"], timestamp="2024-05-01T12:00:00+0000"),
        line(id="bad-2", owner={"id": "u2", "avatar": "a.jpg"}),
        line(id="bad-3", media_url="https://u:p@cdn.example/1.jpg"),
        line(id="bad-4", caption="\ud800"),
        line(id="bad-5", like_count=-1),
    ]).encode()  # fmt: skip
    status, answer = await ingest(api, body, "application/x-ndjson")
    assert status == 202 and answer["accepted"] == 2
    assert [(r["line"], r["reason"].split(":")[0]) for r in answer["rejected"]] == [
        (2, "unknown field(s)"), (5, "owner"), (6, "media_url"), (7, "caption"), (8, "like_count"),
    ]  # fmt: skip
    assert "username goes in owner.username" in answer["rejected"][0]["reason"]
    assert "avatar" in answer["rejected"][1]["reason"] and "user:password@" in answer["rejected"][2]["reason"]

    queued = streamed(redis_client)
    assert [(p.id, p.hashtags, p.source) for p in queued] == [
        ("good-1", ["coffee", "sushi"], "push"), ("good-2", ["ramen"], "push"),
    ]  # fmt: skip
    assert queued[0].owner is not None and queued[0].owner.followers_count == 8 and queued[0].engagement == 0.5
    assert queued[1].timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)
    # the scraper takes them from the stream as Posts, as it takes any
    client = aioredis.Redis.from_url(redis_url)
    try:
        taken = await IngestStream(client).take("a-scraper", 10, idle_ms=60_000)
    finally:
        await client.aclose()
    assert [(p.id, p.hashtags) for _, p in taken] == [("good-1", ["coffee", "sushi"]), ("good-2", ["ramen"])]


async def test_a_json_array_or_one_object_is_taken_too_and_nothing_good_is_a_400_with_the_reasons(
    api: tuple[str, aiohttp.ClientSession], redis_client: redis.Redis
) -> None:
    array = json.dumps([{"id": "a1", "media_url": URL, "caption": "#x"}, {"id": "a2"}, 5], indent=2).encode()
    status, answer = await ingest(api, array, "application/json")
    assert status == 202 and answer["accepted"] == 1
    assert answer["rejected"] == [
        {"line": 2, "reason": "media_url: required: the http(s) URL of the image"},
        {"line": 3, "reason": "expected a JSON object, got int"},
    ]
    pretty = json.dumps({"id": "o1", "media_url": URL, "hashtags": ["#Y"]}, indent=2).encode()
    expected = {"accepted": 1, "rejected_count": 0, "rejected": []}
    assert (await ingest(api, pretty, "application/json")) == (202, expected)
    assert [(p.id, p.hashtags) for p in streamed(redis_client)] == [("a1", ["x"]), ("o1", ["y"])]

    status, answer = await ingest(api, line(user_id="7").encode(), "application/json")
    assert status == 400 and answer["accepted"] == 0 and "user_id goes in owner.id" in answer["rejected"][0]["reason"]
    status, answer = await ingest(api, b"[{]", "application/json")
    assert status == 400 and answer["error"].startswith("body is not a JSON array")
    status, answer = await ingest(api, b"[" * 20_000, "application/json")
    assert status == 400 and "nested too deeply" in answer["error"]
    status, answer = await ingest(api, b"\n \n", "application/x-ndjson")
    assert status == 400 and answer["error"].startswith("empty body")
    assert len(streamed(redis_client)) == 2


def refs_in(node: object) -> set[str]:
    if isinstance(node, dict):
        return {node["$ref"]} if "$ref" in node else set().union(*(refs_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs_in(v) for v in node))
    return set()


async def test_the_openapi_document_describes_the_ingest_body_from_the_model(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    url, http = api
    async with http.get(f"{url}/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    operation = document["paths"]["/ingest"]["post"]
    body = operation["requestBody"]
    ref = {"$ref": "#/components/schemas/PushedPost"}
    assert body["required"] is True
    array = {"type": "array", "items": ref, "minItems": 1}  # an empty array queues nothing: a 400
    assert body["content"]["application/json"]["schema"] == {"anyOf": [ref, array]}
    assert body["content"]["application/x-ndjson"]["schema"] == ref
    assert "one PushedPost object per line" in body["description"]
    assert "an array of them" in body["description"]

    schemas = document["components"]["schemas"]
    pushed, owner = schemas["PushedPost"], schemas["PushedOwner"]
    own = PushedPost.model_json_schema(ref_template="#/components/schemas/{model}")
    assert own.pop("$defs") == {"PushedOwner": owner} and pushed == own  # generated from the model, not written
    assert {"id", "media_url", "caption", "hashtags", "owner"} <= set(pushed["properties"])
    assert pushed["additionalProperties"] is False and owner["additionalProperties"] is False
    assert pushed["required"] == ["id", "media_url"] and owner["required"] == ["id"]
    assert pushed["properties"]["owner"]["anyOf"][0] == {"$ref": "#/components/schemas/PushedOwner"}
    assert pushed["properties"]["hashtags"]["maxItems"] == MAX_HASHTAGS
    assert pushed["properties"]["caption"]["anyOf"][0]["maxLength"] == MAX_CAPTION_CHARS
    assert pushed["properties"]["id"]["maxLength"] == MAX_ID_CHARS
    assert pushed["properties"]["media_url"]["maxLength"] == MAX_URL_CHARS
    assert pushed["properties"]["like_count"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

    ingest_body = {"$ref": "#/components/schemas/IngestBody"}
    assert operation["responses"]["202"]["content"]["application/json"]["schema"] == ingest_body
    assert ingest_body in operation["responses"]["400"]["content"]["application/json"]["schema"]["anyOf"]
    assert set(schemas["IngestBody"]["properties"]) == {"accepted", "rejected_count", "rejected"}
    assert set(schemas["BadRecordBody"]["properties"]) == {"line", "reason"}
    assert operation["security"] == [{"ApiKey": []}]
    assert refs_in(document) <= {f"#/components/schemas/{name}" for name in schemas}  # every $ref resolves
    try:
        from openapi_spec_validator import validate  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # not a dependency; where it is installed, the document must pass it
        return
    validate(document)
