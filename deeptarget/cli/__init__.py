"""``deeptarget`` command line.

    deeptarget demo [--once]              everything on the embedded default, with the sandbox as the source
    deeptarget redis                      run the embedded Redis for the data dir in the foreground
    deeptarget sandbox [--port N]         serve the sandbox social network
    deeptarget scrape [--forever]         crawl the configured hashtags/accounts into the infer queue
    deeptarget worker --queues infer,...  a Celery worker
    deeptarget beat                       periodic tasks (hashtag model refits)
    deeptarget serve                      the query API
    deeptarget query similar|hashtags|user|audience ...
    deeptarget profiles export PATH.jsonl|PATH.parquet
    deeptarget explain IMAGE --head N [--class C] [--similar POST_ID]   a heat map of what drove the class
    deeptarget train | index snapshot|rebuild
    deeptarget train-head DATA_DIR --name N [--folds K] [--finetune] [--publish] / publish-head NAME VERSION
    deeptarget reclassify [HEAD...]       apply published heads to the stored embeddings, refresh profiles
    deeptarget reembed                    embed the stored posts again after a change of backbone or weights
    deeptarget train-likability           a likable-or-not head from the stored likes / followers
    deeptarget compare-backbones DATA_DIR accuracy, size and speed of each backbone
    deeptarget report [--out DIR]         HTML report of the live system
    deeptarget store-copy --to URL        copy the metadata store (e.g. SQLite -> PostgreSQL)
    deeptarget enqueue FILE.jsonl         push posts (JSON lines with id and media_url) to the scraper
    deeptarget delete POST_ID...          forget posts and take them out of the index
    deeptarget deadletter list|retry|drop [IDS] [--all]   tasks that failed for good
    deeptarget models fetch [NAME...] [--mirror URL|DIR] | models list   the model files (the only download)

Settings come from DEEPTARGET_* variables and ``--config FILE`` (TOML); see deeptarget/core/settings.py.

Each group of commands is one module holding its commands' arguments next to their bodies (``services``,
``queries``, ``explain``, ``maintenance``, ``training``, ``operations``); ``context`` has what they share. The parser
is put together here, in that order, which is the order ``--help`` lists them in.
"""

from __future__ import annotations

import argparse
import sys

from deeptarget.cli import explain, maintenance, models, operations, queries, services, training
from deeptarget.cli.context import add_global_options, setup_logging
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.terminal import plain

__all__ = ["build_parser", "main"]

_GROUPS = (services, queries, explain, maintenance, training, operations, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeptarget", description=__doc__.split("\n\n")[0])
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from redis.exceptions import RedisError  # once a command runs: never for --help or a mistyped command

    try:
        return int(args.run(args) or 0)
    except DeepTargetError as err:
        print(f"deeptarget: error: {plain(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file not there, not readable, a directory: the reason, not a traceback
        print(f"deeptarget: error: {plain(err)}", file=sys.stderr)
        return 1
    except RedisError as err:
        print(f"deeptarget: error: Redis: {plain(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
