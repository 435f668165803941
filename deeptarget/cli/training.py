"""Heads, backbones and reports: ``train-head``, ``publish-head``, ``reclassify``, ``reembed``, ``train-likability``,
``compare-backbones`` and ``report``.

The training code and the models load torch; each command imports them when it runs, after its arguments and its
data folder were checked.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, get_args

from rich.console import Console, Group
from rich.table import Table

from deeptarget.cli.arguments import checked, number, whole
from deeptarget.cli.context import connected_settings, load_settings, metadata_store, senders
from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import plain, shown


def _head_name(text: str) -> str:
    from deeptarget.models.heads import check_head_name  # numpy, for a rule that takes no model

    return checked(check_head_name)(text)


def _checked_version(text: str) -> int:
    from deeptarget.models.heads import check_version  # numpy, for a rule that takes no model

    return check_version(whole(1, 10**9)(text))


def _folds(text: str) -> int:
    value = whole(0, 1000)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("K-fold cross-validation needs K >= 2 (0: none)")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train_head = sub.add_parser("train-head", help="train a classification head on a labelled image folder")
    train_head.add_argument(
        "images",
        metavar="DATA_DIR",
        help="train/ and test/ folders per class, train.txt/test.txt, or a folder per class",
    )
    train_head.add_argument("--name", required=True, type=_head_name,
                            help="the head's name (e.g. food): lowercase letters, digits, _ and -")  # fmt: skip
    fields = Settings.model_fields
    train_head.add_argument("--backbone", choices=get_args(fields["backbone"].annotation),
                            help="default: the backbone setting (the one the workers run)")  # fmt: skip
    train_head.add_argument("--weights", help="imagenet, none, auto or a .pth file (default: the weights setting)")
    train_head.add_argument("--normalization", choices=get_args(fields["weights_normalization"].annotation),
                            help="input scaling of the weights")  # fmt: skip
    train_head.add_argument("--publish", action="store_true", help="make it the version workers use")
    train_head.add_argument("--l2", type=number(0), default=1e-3, help="L2 penalty of the logistic regression")
    train_head.add_argument("--folds", type=_folds, default=0, help="also report K-fold cross-validation (K >= 2)")
    train_head.add_argument(
        "--finetune", action="store_true", help="fine-tune the backbone end to end (resumes from its checkpoint)"
    )
    train_head.add_argument("--epochs", type=whole(1, 10_000), default=8, help="fine-tuning epochs")
    train_head.add_argument("--batch-size", type=whole(1, 65536), default=32, help="fine-tuning batch size")
    train_head.add_argument("--lr", type=number(0, above=True), default=1e-3,
                            help="fine-tuning peak learning rate of the head")  # fmt: skip
    train_head.add_argument("--restart", action="store_true", help="fine-tuning: ignore an existing checkpoint")
    train_head.set_defaults(run=cmd_train_head)

    publish = sub.add_parser("publish-head", help="make a trained head version the one workers use")
    publish.add_argument("name", type=_head_name)
    publish.add_argument("version", type=_checked_version)
    publish.set_defaults(run=cmd_publish_head)

    reclassify = sub.add_parser("reclassify", help="apply the published heads to the stored embeddings")
    reclassify.add_argument("heads", nargs="*", type=_head_name, help="head names (default: every published head)")
    reclassify.set_defaults(run=cmd_reclassify)

    reembed = sub.add_parser("reembed", help="embed the stored posts again after a change of backbone or weights")
    reembed.add_argument("--no-wait", action="store_true", help="queue them and return (then: index rebuild)")
    reembed.add_argument("--timeout", type=number(0, above=True), default=24 * 3600.0,
                         help="seconds to wait for the workers")  # fmt: skip
    reembed.set_defaults(run=cmd_reembed)

    likability = sub.add_parser("train-likability", help="train the likability head from the stored engagement")
    likability.add_argument("--model-id", help="embeddings of this model (default: the one most posts have)")
    likability.add_argument("--publish", action="store_true", help="make it the version workers use")
    likability.set_defaults(run=cmd_train_likability)

    compare = sub.add_parser("compare-backbones", help="accuracy, size and speed of backbones on a labelled folder")
    compare.add_argument("images", metavar="DATA_DIR", help="a labelled image folder, as for train-head")
    compare.add_argument(
        "--backbone",
        action="append",
        help="NAME, NAME=WEIGHTS or NAME=WEIGHTS:NORMALIZATION; repeat it (default: every known backbone)",
    )
    compare.add_argument("--timing-images", type=whole(1, 100_000), default=64,
                         help="images embedded to time each backbone")  # fmt: skip
    compare.set_defaults(run=cmd_compare_backbones)

    report = sub.add_parser("report", help="an HTML report of the live system (posts, faces, classes, engagement)")
    report.add_argument("--out", help="folder for index.html and its PNGs (default: data/reports/system-<time>)")
    report.set_defaults(run=cmd_report)


def cmd_train_head(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    overrides = {"backbone": args.backbone, "weights": args.weights, "weights_normalization": args.normalization}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    console = Console(emoji=False)
    if args.finetune and args.folds:
        raise ConfigurationError("--folds cross-validates the linear head; it does not apply to --finetune")
    from deeptarget.training.datasets import load_labelled  # numpy; the trainers below load torch

    load_labelled(Path(args.images))  # a folder that can't be trained on says so before the models load
    if args.finetune:
        from deeptarget.training.finetune import FinetuneOptions, finetune  # torch

        options = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, restart=args.restart)
        trained = finetune(settings, Path(args.images), args.name, options, publish=args.publish)
    else:
        from deeptarget.training.train_head import train_head  # torch

        trained = train_head(settings, Path(args.images), args.name, publish=args.publish, l2=args.l2, folds=args.folds)
    head = trained.head
    console.print(f"head [bold]{shown(head.name)}[/] v{head.version} on {shown(head.model_id)}: "
                  f"{trained.train_images} training images, {trained.test_images} held out, {trained.skipped} "
                  "unusable")  # fmt: skip
    console.print(_metrics_table(trained.metrics))
    if trained.report_path:
        console.print(f"report: {shown(trained.report_path)}")
    for line in trained.notes:
        console.print(shown(line))
    state = (
        "published"
        if args.publish
        else f"saved; publish with: deeptarget publish-head {args.name} {trained.head.version}"
    )
    console.print(state)
    return 0


def _metrics_table(metrics: dict[str, Any]) -> Group:
    summary = Table("", "top-1", "top-5", "macro-F1")
    summary.add_row("held out", f"{metrics['top1']:.3f}", f"{metrics['top5']:.3f}", f"{metrics['macro_f1']:.3f}")
    if "top1_tta" in metrics:
        summary.add_row("held out, TTA", f"{metrics['top1_tta']:.3f}", f"{metrics['top5_tta']:.3f}",
                        f"{metrics['macro_f1_tta']:.3f}")  # fmt: skip
    for fold in metrics.get("folds", []):
        summary.add_row(f"fold {fold['fold']}", f"{fold['top1']:.3f}", f"{fold['top5']:.3f}", f"{fold['macro_f1']:.3f}")
    if metrics.get("folds"):
        from deeptarget.training.linear import fold_statistics  # torch (loaded already by the training above)

        means = [f"{mean:.3f}" for mean, _ in fold_statistics(metrics["folds"]).values()]
        summary.add_row(f"{len(metrics['folds'])}-fold mean", *means)
    per_class = Table("class", "precision", "recall")
    for name, values in metrics["per_class"].items():
        per_class.add_row(shown(name), f"{values['precision']:.3f}", f"{values['recall']:.3f}")  # folder names
    return Group(summary, per_class)


def cmd_publish_head(args: argparse.Namespace) -> int:
    from deeptarget.models.heads import publish_head  # numpy

    publish_head(load_settings(args).heads_dir, args.name, args.version)
    print(f"head {args.name} v{args.version} published: running workers use it from their next batch")
    return 0


def cmd_reclassify(args: argparse.Namespace) -> int:
    from deeptarget.ops.reclassify import published_heads, reclassify  # numpy, the store

    settings = load_settings(args)
    heads = published_heads(settings.heads_dir, args.heads or None)
    if not heads:
        raise ConfigurationError(f"no published head in {settings.heads_dir}")
    done = reclassify(
        metadata_store(settings),
        heads,
        half_life_days=settings.profile_half_life_days,
        outlier_k=settings.follower_outlier_k,
    )
    for name, version in done.heads.items():
        print(f"head {name} v{version}: {done.posts[name]} stored posts reclassified")
    print(f"{done.profiles} profiles rebuilt")
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    from deeptarget.models.embedder import Embedder  # torch
    from deeptarget.ops.reembed import rebuild_index, send_reembed, wait_until_reembedded  # numpy, the store

    settings = connected_settings(args)
    model_id = Embedder.from_settings(settings).model_id
    store, send, console = metadata_store(settings), senders(settings), Console(emoji=False)
    sent = send_reembed(store, send, model_id, settings.batch_size)
    console.print(f"{sent} posts queued to be embedded again with {shown(model_id)}; the workers must run these "
                  "settings")  # fmt: skip
    if args.no_wait:
        console.print("when they are done: deeptarget index rebuild")
        return 0
    with console.status("re-embedding") as status:
        left = wait_until_reembedded(
            store, model_id, args.timeout, lambda n: status.update(f"re-embedding: {n} posts left")
        )
    if left:
        console.print(f"{left} posts still carry another model's embedding after {args.timeout:.0f} s: are the "
                      f"workers running with {shown(model_id)}? The index was not rebuilt.")  # fmt: skip
        return 1
    rebuild_index(send)
    console.print("every post re-embedded; the index rebuild for the new model is on the index queue")
    return 0


def cmd_train_likability(args: argparse.Namespace) -> int:
    from deeptarget.training.likability import train_likability  # torch

    trained = train_likability(load_settings(args), model_id=args.model_id, publish=args.publish)
    m = trained.metrics
    print(
        f"likability v{trained.head.version} on {plain(trained.model_id)}: {trained.train_posts} training posts, "
        f"{trained.test_posts} held out, {trained.outlier_posts} from follower-count outliers left out"
    )
    print(f"accuracy {m['accuracy']:.3f}   average precision {m['average_precision']:.3f} "
          f"(random {m['positive_share']:.3f})   ROC AUC {m['roc_auc']:.3f}")  # fmt: skip
    print(f"report: {trained.report_path}")
    return 0


def cmd_compare_backbones(args: argparse.Namespace) -> int:
    from deeptarget.models.embedder import BACKBONES  # torch
    from deeptarget.training.backbones import BackboneSpec, compare_backbones, comparison_report  # torch

    settings = load_settings(args)
    specs = [BackboneSpec.parse(text, settings) for text in (args.backbone or list(BACKBONES))]
    results = compare_backbones(settings, Path(args.images), specs, timing_images=args.timing_images)
    table = Table("backbone", "weights", "params (M)", "size (MB)", "ms/image", "top-1", "top-5", "macro-F1")
    for r in results:
        scores = [f"{r.metrics[k]:.3f}" for k in ("top1", "top5", "macro_f1")]
        sizes = [f"{r.parameters_m:.1f}", f"{r.size_mb:.1f}", f"{r.ms_per_image:.1f}"]
        table.add_row(shown(r.spec.name), shown(r.model_id.split(":")[1]), *sizes, *scores)
    console = Console(emoji=False)
    console.print(table)
    folder = settings.reports_dir / f"backbones-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"report: {shown(comparison_report(Path(args.images), results).write(folder))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deeptarget.reports.live import write_system_report  # numpy, PIL, matplotlib

    settings = load_settings(args)
    folder = Path(args.out) if args.out else settings.reports_dir / f"system-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"report: {write_system_report(metadata_store(settings), folder)}")
    return 0
