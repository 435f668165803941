"""Local queries: ``query similar|hashtags|user|audience`` and ``profiles export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from deeptarget.cli.arguments import input_file, number, post_id, whole
from deeptarget.cli.context import load_settings, metadata_store, print_json
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.terminal import plain

MAX_K = 1000  # as the API's


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    query = sub.add_parser("query", help="query the index and profiles locally")
    query.add_argument("what", choices=["similar", "hashtags", "user", "audience"])
    query.add_argument("user", nargs="?", help="user id or username (query user); interest (query audience)")
    query.add_argument("--post-id", type=post_id)
    query.add_argument("--image", help="path of an image file")
    query.add_argument("-k", type=whole(1, MAX_K), default=10, help=f"how many results (1 to {MAX_K})")
    query.add_argument("--hashtag", help="similar: only posts with this hashtag")
    query.add_argument("--since", help="similar: only posts from this ISO date on")
    query.add_argument("--until", help="similar: only posts before this ISO date")
    query.add_argument("--has-face", choices=["yes", "no"], help="similar: only posts with / without a face")
    query.add_argument("--min-score", type=number(0, 1), default=0.0, help="audience: least share of the interest")
    query.add_argument("--min-posts", type=whole(1, 1_000_000), default=1, help="audience: least posts per user")
    query.add_argument("--exclude-outliers", action="store_true", help="audience: no follower-count outliers")
    query.set_defaults(run=cmd_query)

    profiles = sub.add_parser("profiles", help="export every user profile")
    profiles.add_argument("action", choices=["export"])
    profiles.add_argument("path", help="output file (.jsonl or .parquet)")
    profiles.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file's suffix")
    profiles.set_defaults(run=cmd_profiles)


def _read_file(path: str, limit: int, what: str) -> bytes:
    """A whole file of at most ``limit`` bytes, or a ``DeepTargetError`` saying why not."""
    input_file(path, what)
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise DeepTargetError(f"{what} {plain(path)}: larger than {limit} bytes")
    return data


def cmd_query(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    image = _read_file(args.image, settings.max_upload_bytes, "--image") if args.image else None  # before the models

    from deeptarget.query.service import PostFilter, QueryService  # torch and FAISS, once the image was read

    service = QueryService(settings)
    if args.what == "similar":
        try:
            has_face = {"yes": True, "no": False}.get(args.has_face or "")
            where = PostFilter.parse(args.hashtag, args.since, args.until, has_face)
        except ValueError as err:
            raise DeepTargetError(str(err)) from None
        if args.post_id:
            results = service.similar_to_post(args.post_id, args.k, where)
        elif image is not None:
            results = service.similar_to_image(image, args.k, where)
        else:
            raise DeepTargetError("query similar needs --post-id or --image")
        print_json([r.to_json() for r in results])
    elif args.what == "hashtags":
        if image is None:
            raise DeepTargetError("query hashtags needs --image")
        tags, _ = service.suggest_hashtags(image, args.k)
        print_json([{"hashtag": t, "score": round(s, 6)} for t, s in tags])
    elif args.what == "audience":
        if not args.user:
            raise DeepTargetError("query audience needs an interest, e.g. sushi, food:sushi or '#sushi'")
        key, members = service.audience(args.user, args.min_score, args.min_posts, args.k, args.exclude_outliers)
        print_json({"interest": key, "users": [
            {"user_id": m.user_id, "username": m.profile.username, "score": round(m.score, 6),
             "post_count": m.profile.post_count, "followers_count": m.profile.followers_count}
            for m in members
        ]})  # fmt: skip
    else:
        if not args.user:
            raise DeepTargetError("query user needs a user id or username")
        print_json(service.profile(args.user).model_dump(mode="json"))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from deeptarget.profiles.export import export_profiles  # numpy, pyarrow for parquet

    settings = load_settings(args)
    path = Path(args.path)
    fmt = args.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    count = export_profiles(metadata_store(settings), path, fmt)
    print(f"{count} profiles written to {path} ({fmt})")
    return 0
