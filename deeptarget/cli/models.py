"""The model files: ``models fetch [NAME ...] [--mirror URL|DIR] [--force]`` and ``models list [--json]``.

``models fetch`` is the one command of the project that touches the network, and only when run; nothing downloads at
run time. Without a NAME it fetches what the configuration needs (``models.files.needed_files``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deeptarget.cli.arguments import number
from deeptarget.cli.context import load_settings, print_json
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.terminal import plain, shown

if TYPE_CHECKING:
    from deeptarget.core.settings import Settings
    from deeptarget.models.fetch import FetchOptions
    from deeptarget.models.files import ModelFile


def _model_name(text: str) -> str:
    from deeptarget.models.files import MODEL_FILES

    if text not in MODEL_FILES:
        raise argparse.ArgumentTypeError(f"unknown model {plain(text)!r}: one of {', '.join(MODEL_FILES)}")
    return text


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deeptarget.models.files import MODEL_FILES  # no torch: the registry is plain data

    models = sub.add_parser("models", help="the model files: fetch them (the only command that downloads), list them")
    actions = models.add_subparsers(dest="models_command", required=True)
    fetch = actions.add_parser(
        "fetch",
        help="download model files into the caches where the code looks, each checked against its recorded SHA-256",
    )
    fetch.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        type=_model_name,
        help=f"{', '.join(MODEL_FILES)} (default: what the configuration needs)",
    )
    fetch.add_argument(
        "--mirror",
        metavar="URL|DIR",
        help="fetch the same file names from URL/<file name> (an internal mirror) or copy them from a folder",
    )
    fetch.add_argument("--force", action="store_true", help="fetch again even a file that is there and verified")
    fetch.add_argument(
        "--connect-timeout", type=number(0, 3600, above=True), default=15.0, metavar="S", help="seconds (15)"
    )
    fetch.add_argument(
        "--read-timeout",
        type=number(0, 3600, above=True),
        default=60.0,
        metavar="S",
        help="seconds without data before a download is given up (60)",
    )
    fetch.set_defaults(run=cmd_fetch)

    listing = actions.add_parser("list", help="each model file: present, verified, and what `auto` will use")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_list)


def cmd_fetch(args: argparse.Namespace) -> int:
    from deeptarget.models.fetch import FetchOptions
    from deeptarget.models.files import MODEL_FILES, needed_files

    settings = load_settings(args)
    entries = [MODEL_FILES[name] for name in dict.fromkeys(args.names)] or needed_files(settings)
    if not entries:
        print("the configuration needs no model file (weights and face detector are set to files or off)")
        return 0
    options = FetchOptions(args.mirror, args.force, args.connect_timeout, args.read_timeout)
    if options.mirror_dir is not None and not options.mirror_dir.is_dir():
        raise DeepTargetError(f"--mirror {plain(args.mirror)}: no such folder (a mirror URL starts with http(s)://)")
    return fetch_and_report(entries, settings, options)


def fetch_and_report(entries: list[ModelFile], settings: Settings, options: FetchOptions) -> int:
    """Fetch ``entries`` with a progress bar (on stderr); one line per file on stdout, one per failure on stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from deeptarget.models.fetch import fetch_files

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def advance(entry: ModelFile, done: int, total: int | None) -> None:
            if entry.name not in tasks:
                tasks[entry.name] = progress.add_task(entry.file_name, total=total)
            progress.update(tasks[entry.name], completed=done, total=total)

        fetched, failed = fetch_files(entries, settings.model_files_dir, options, advance)
    for item in fetched:
        print(plain(item.shown))
    for err in failed:
        print(f"deeptarget: models fetch: {plain(err)}", file=sys.stderr)
    return 1 if failed else 0


def model_rows(settings: Settings, registry: Mapping[str, ModelFile] | None = None) -> dict[str, Any]:
    """What ``models list`` shows: each file of the registry (where, present, verified, needed), and what ``auto``
    will use with these settings (``weights_choice``, ``face_model_file``, ``choose_face_detector``)."""
    from deeptarget.models.embedder import resolve_device  # torch
    from deeptarget.models.faces import choose_face_detector
    from deeptarget.models.files import (
        MODEL_FILES,
        cache_path,
        check_file,
        face_model_file,
        needed_files,
        weights_choice,
    )

    files = MODEL_FILES if registry is None else registry
    needed = {entry.name for entry in needed_files(settings, files)}
    rows = []
    for entry in files.values():
        check = check_file(entry, cache_path(entry, settings.model_files_dir))
        rows.append(
            {
                "name": entry.name,
                "file": entry.file_name,
                "path": str(check.path),
                "present": check.present,
                "verified": check.ok,
                "status": check.status,
                "check": "sha256" if entry.full_digest else "sha256-prefix",
                "sha256": entry.sha256,
                "digest_source": entry.digest_source,
                "needed": entry.name in needed,
                "url": entry.url,
            }
        )
    weights = weights_choice(settings.backbone, settings.weights, files)
    device = str(resolve_device(settings.device))
    if settings.face_policy == "off":
        face = {"detector": "off", "why": "face_policy = 'off'", "model_file": None}
    else:
        model_file = face_model_file(settings, files)
        detector, why = choose_face_detector(settings.face_detector, model_file, device)
        face = {"detector": detector, "why": why, "model_file": str(model_file) if model_file else None}
    return {
        "models": rows,
        "auto": {
            "backbone": settings.backbone,
            "weights_setting": settings.weights,
            "weights": weights.weights,
            "weights_file": str(weights.path) if weights.path else None,
            "weights_shown": weights.shown,
            "weights_problem": weights.error or weights.warning,
            "face_detector": face["detector"],
            "face_why": face["why"],
            "face_model_file": face["model_file"],
            "device": device,
        },
    }


def cmd_list(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    report = model_rows(settings)
    if args.json:
        print_json(report)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="model files")
    for column in ("name", "file", "status", "needed"):
        table.add_column(column, overflow="fold")
    table.add_column("where", overflow="fold")
    for row in report["models"]:
        table.add_row(row["name"], row["file"], shown(row["status"]), "yes" if row["needed"] else "",
                      shown(row["path"]))  # fmt: skip
    console = Console(emoji=False)
    console.print(table)
    auto = report["auto"]
    console.print(f"weights ({shown(auto['weights_setting'])}, {auto['backbone']}): {shown(auto['weights_shown'])}",
                  markup=False)  # fmt: skip
    console.print(f"face detector: {auto['face_detector']} ({shown(auto['face_why'])}; device {auto['device']})",
                  markup=False)  # fmt: skip
    if any(row["needed"] and not row["verified"] for row in report["models"]):
        console.print("fetch what is needed: deeptarget models fetch [--mirror URL|DIR]", markup=False)
    return 0
