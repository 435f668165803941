"""``train`` and ``index snapshot|rebuild``: the hashtag model and the FAISS index the API serves, refit or rebuilt
by a task on their queue, or with ``--local`` in this process."""

from __future__ import annotations

import argparse

from deeptarget import jobs
from deeptarget.cli.context import load_settings, metadata_store, send


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser("train", help="refit the hashtag model (a task on the train queue)")
    train.add_argument("--local", action="store_true", help="fit in this process instead")
    train.set_defaults(run=cmd_train)

    index = sub.add_parser("index", help="index maintenance (tasks on the index queue)")
    index.add_argument("action", choices=["snapshot", "rebuild"])
    index.add_argument("--local", action="store_true", help="rebuild in this process (stop the index worker first)")
    index.set_defaults(run=cmd_index)


def cmd_train(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if args.local:
        from deeptarget.models.hashtags import HashtagModel  # implicit and scipy, only to fit here

        ids, tags = metadata_store(settings).image_hashtags()
        model = HashtagModel.fit_with(settings, ids, tags)
        print(f"hashtag model v{model.save(settings.hashtag_model_dir)} published")
        return 0
    return send(settings, jobs.train_task)


def cmd_index(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if args.action == "rebuild" and args.local:
        from deeptarget.index.writer import IndexWriter  # FAISS, only to rebuild here

        writer = IndexWriter.from_settings(settings, metadata_store(settings))
        print(f"rebuilt the index from the metadata store: {writer.rebuild()} vectors")
        return 0
    return send(settings, jobs.snapshot_task if args.action == "snapshot" else jobs.rebuild_task)
