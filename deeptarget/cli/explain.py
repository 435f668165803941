"""``explain IMAGE --head NAME [--class C] [--similar POST_ID] [--out FILE.png] [--json]``: the image with a heat map
of the regions that drove a head's class (or that make it similar to an indexed post), and the head's top classes."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deeptarget.cli.arguments import checked, input_file, post_id
from deeptarget.cli.context import load_settings, print_json
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.terminal import plain, shown
from deeptarget.store.versioned import atomic_write

# models.explain.METHODS and DEFAULT_METHOD, without importing torch for --help (tests/test_explain.py compares them)
METHODS = ("gradcam", "occlusion")
DEFAULT_METHOD = "occlusion"


def _head_name(text: str) -> str:
    from deeptarget.models.heads import check_head_name  # numpy, for a rule that takes no model

    return checked(check_head_name)(text)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = sub.add_parser("explain", help="a heat map of what drove a head's class (or a similarity) in an image")
    explain.add_argument("image", metavar="IMAGE", help="the image file")
    explain.add_argument("--head", type=_head_name, help="the head whose class is explained (its published version)")
    explain.add_argument("--class", dest="class_name", help="the class to explain (default: the most probable)")
    explain.add_argument("--similar", type=post_id, metavar="POST_ID",
                         help="explain which regions make the image similar to this indexed post")  # fmt: skip
    explain.add_argument("--out", type=Path, help="the PNG to write (default: IMAGE's name + .explained.png, here)")
    explain.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                         help=f"captum method (default: {DEFAULT_METHOD}; gradcam: 1 pass, occlusion: 49)")  # fmt: skip
    explain.add_argument("--json", action="store_true", help="print JSON instead of a table")
    explain.set_defaults(run=cmd_explain)


def _read_image(path: str, limit: int) -> bytes:
    input_file(path, "IMAGE")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise DeepTargetError(f"IMAGE {plain(path)}: larger than {limit} bytes (max_upload_bytes)")
    return data


def cmd_explain(args: argparse.Namespace) -> int:
    if args.head is None and args.similar is None:
        raise DeepTargetError("explain needs --head NAME (a class of it) or --similar POST_ID")
    if args.class_name is not None and args.head is None:
        raise DeepTargetError("--class needs --head")
    settings = load_settings(args)
    data = _read_image(args.image, settings.max_upload_bytes)  # before the models
    out = args.out or Path(Path(args.image).name + ".explained.png")

    from deeptarget.query.explain import ExplainService  # torch and captum, once the image was read

    service = ExplainService(settings, method=args.method)
    explanation = service.explain(data, args.head, args.class_name, args.similar)
    png = explanation.png()
    atomic_write(out, lambda handle: handle.write(png))
    if args.json:
        print_json({
            "out": str(out), "explained": explanation.explained, "score": round(explanation.score, 6),
            "method": explanation.method, "head": args.head,
            "classes": [{"class": c, "probability": round(p, 6)} for c, p in explanation.classes],
        })  # fmt: skip
        return 0
    console = Console()
    kind, _, what = explanation.explained.partition(":")
    if kind == "similar":
        console.print(f"cosine similarity to post {shown(what)}: {explanation.score:.3f}")
    else:
        console.print(f"{shown(what)}: probability {explanation.score:.3f}")
    if explanation.classes:
        table = Table("class", "probability", title=f"head {shown(args.head)}")
        for name, probability in explanation.classes:
            table.add_row(shown(name), f"{probability:.3f}")
        console.print(table)
    console.print(f"heat map ({explanation.method}) written to {shown(str(out))}")
    return 0
