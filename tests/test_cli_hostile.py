"""The command line under hostile arguments and hostile data (issue 12, L7, L9, L10), on real processes and a real
Redis: every bad argument is a clear error with exit code 1 or 2, never a traceback, and nothing is written outside
the data dir; data shown on the terminal is shown literally, its control characters removed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from rich.console import Console

from deeptarget import jobs
from deeptarget.cli import main
from deeptarget.cli.arguments import POST_ID_RE
from deeptarget.cli.demo import _print_summary, similar_table
from deeptarget.core import keys
from deeptarget.core.records import Owner, Post, Prediction, Profile
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import json_text, plain, shown
from deeptarget.models.heads import HeadSet, InvalidName, LinearHead, head_versions, publish_head
from deeptarget.reports.html import Report, new_figure, report_folder
from deeptarget.scraper.push import ID_PATTERN
from deeptarget.store.metadata import MetadataStore
from deeptarget.training.finetune import finetune
from deeptarget.training.train_head import train_head
from deeptarget.workers.deadletter import DeadLetter, DeadLetters
from tests.conftest import make_settings

ESCAPING_NAMES = ["../../../x", "a/b", "..", ".", "", "A", "x" * 65, "-x", "x\n"]
HOSTILE_TEXT = ["[/]", "[bold red]x", "\x1b[31mred\x1b]0;title\x07", "a\rb", "\u202eevil", "[link=http://e.vil]y"]
SHOWN_AS = ["[/]", "[bold red]x", "[31mred]0;title", "ab", "evil", "[link=http://e.vil]y"]
CONTROLS = ["\x1b", "\r", "\x07", "\u202e", "\x9b"]


def run_many(settings: Settings, commands: list[list[str]], **env: str) -> list[subprocess.CompletedProcess[str]]:
    """``python -m deeptarget`` once per command, all at once (each is a fresh process on the real Redis)."""
    environment = os.environ | settings.to_env() | env
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "deeptarget", *args],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    done = []
    for args, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def outside(created: set[Path], data_dir: Path) -> set[Path]:
    """What was created neither in the data dir nor as one of its parents."""
    return {p for p in created if not p.is_relative_to(data_dir) and not data_dir.is_relative_to(p)}


@pytest.fixture
def cli_settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path / "home" / "data", redis_url)


# -- L7: names that would leave the data dir --------------------------------------------------------------------------
def test_train_head_refuses_names_that_leave_the_data_dir(tmp_path: Path, cli_settings: Settings) -> None:
    photos = tmp_path / "photos"
    for label in ("red", "blue"):
        (photos / label).mkdir(parents=True)
    outside_dir = tmp_path / "outside"
    names = [*ESCAPING_NAMES, str(outside_dir / "x")]
    before = files_under(tmp_path)
    commands = [["train-head", str(photos), "--name", name] for name in names]
    commands += [["publish-head", name, "1"] for name in names[:3]] + [["reclassify", name] for name in names[-3:]]
    commands += [["publish-head", "food", v] for v in ("-1", "x", "99999999999")]
    runs = run_many(cli_settings, commands)
    for run in runs:
        assert run.returncode == 2 and "Traceback" not in run.stderr, (run.args, run.stderr)
        assert "error: " in run.stderr, (run.args, run.stderr)
    assert not outside(files_under(tmp_path) - before, cli_settings.data_dir)
    assert not outside_dir.exists() and not (tmp_path / "x").exists()


def test_a_nul_byte_in_a_name_is_an_argument_error(cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """(A NUL byte cannot be passed to a process: this is main() in this one.)"""
    for args in (["train-head", "photos", "--name", "a\x00b"], ["publish-head", "a\x00b", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--data-dir", str(cli_settings.data_dir), *args])
        assert exit_info.value.code == 2 and "head name 'a\\x00b'" in capsys.readouterr().err  # the NUL shown escaped


def test_library_functions_refuse_names_that_leave_their_folder(tmp_path: Path) -> None:
    heads = tmp_path / "heads"
    settings = make_settings(tmp_path / "data")
    weight, bias = np.zeros((2, 4), np.float32), np.zeros(2, np.float32)
    for name in [*ESCAPING_NAMES, str(tmp_path / "abs"), "a\x00b", None, 7]:
        for call in (
            lambda n=name: head_versions(heads, n),
            lambda n=name: LinearHead(n, 1, ["a", "b"], weight, bias, "m", {}).save(heads),
            lambda n=name: publish_head(heads, n, 1),
            lambda n=name: train_head(settings, tmp_path / "none", n),
            lambda n=name: finetune(settings, tmp_path / "none", n),
        ):
            with pytest.raises(ValueError):
                call()
    for version in (0, -1, True, 1.5, 10**10):
        with pytest.raises(InvalidName):
            LinearHead("food", version, ["a", "b"], weight, bias, "m", {}).save(heads)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            publish_head(heads, "food", version)  # type: ignore[arg-type]
    for name in ["../x", "a/b", "..", "", "/abs", "a\x00b"]:
        with pytest.raises(ValueError):
            report_folder(tmp_path / "reports", name)
        with pytest.raises(ValueError):
            Report("t").figure(name, new_figure(), "caption")
    assert files_under(tmp_path) <= {heads} and not (tmp_path / "abs").exists()
    # A folder in heads_dir whose name is no head's is not one: workers and listings leave it alone.
    LinearHead("food", 1, ["a", "b"], weight, bias, "m", {}).save(heads)
    (heads / "Not A Head").mkdir()
    assert list(HeadSet(heads, "m").heads) == ["food"]


# -- L10: hostile arguments ----------------------------------------------------------------------------------------
def hostile_commands(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(arguments, what stderr must say)."""
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x00" * 200_000 + b"\n" + bytes(range(256)) * 64)  # a 200 KB line, then binary
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"\x00" * 5000)
    (tmp_path / "a-dir").mkdir()
    missing, directory = str(tmp_path / "missing"), str(tmp_path / "a-dir")
    return [
        (["deadletter", "retry", "abc"], "is not a dead letter id"),
        (["deadletter", "drop", "abc"], "is not a dead letter id"),
        (["deadletter", "retry", "1-2-3"], "is not a dead letter id"),
        (["deadletter", "drop", "99999999999999999999999-0"], "is not a dead letter id"),
        (["deadletter", "retry", "-0"], "is not a dead letter id"),
        (["deadletter", "retry", "1-0"], "no dead letter 1-0"),
        (["deadletter", "retry"], "name entry ids, or --all"),
        (["deadletter", "list", "--limit", "-1"], "argument --limit"),
        (["deadletter", "list", "--limit", "0"], "argument --limit"),
        (["delete", ""], "argument post_ids"),
        (["delete", "../x"], "argument post_ids"),
        (["query", "similar", "--post-id", "x", "-k", "-1"], "argument -k"),
        (["query", "similar", "--post-id", "x", "-k", "nan"], "argument -k"),
        (["query", "similar", "--post-id", "x", "-k", "1000000"], "argument -k"),
        (["query", "similar", "--post-id", ""], "argument --post-id"),
        (["query", "audience", "sushi", "--min-score", "nan"], "argument --min-score"),
        (["query", "audience", "sushi", "--min-score", "inf"], "argument --min-score"),
        (["query", "audience", "sushi", "--min-posts", "0"], "argument --min-posts"),
        (["query", "similar", "--image", missing], "No such file or directory"),
        (["query", "similar", "--image", directory], "a directory"),
        (["query", "hashtags", "--image", "/dev/zero"], "not a regular file"),
        (["query", "hashtags", "--image", str(big)], "larger than 4096 bytes"),
        (["enqueue", missing], "No such file or directory"),
        (["enqueue", directory], "a directory"),
        (["enqueue", "/dev/zero"], "not a regular file"),
        (["enqueue", str(binary)], "rejected: not UTF-8 text"),
        (["worker", "--name", "../../x"], "argument --name"),
        (["worker", "--concurrency", "0"], "argument --concurrency"),
        (["scrape", "--interval", "nan"], "argument --interval"),
        (["sandbox", "--port", "70000"], "argument --port"),
        (["demo", "--posts", "-3"], "argument --posts"),
        (["train-head", directory, "--name", "x", "--folds", "1"], "argument --folds"),
        (["train-head", directory, "--name", "x", "--lr", "nan"], "argument --lr"),
        (["train-head", missing, "--name", "x"], "not a folder"),
        (["train-head", directory, "--name", "x"], "expected train/ and test/"),
        (["reembed", "--timeout", "inf"], "argument --timeout"),
        (["compare-backbones", directory, "--timing-images", "0"], "argument --timing-images"),
        (["profiles", "export", directory], "error:"),
    ]


def test_hostile_arguments_are_clear_errors(tmp_path: Path, cli_settings: Settings) -> None:
    cases = hostile_commands(tmp_path)
    before = files_under(tmp_path)
    runs = run_many(cli_settings, [args for args, _ in cases], DEEPTARGET_MAX_UPLOAD_BYTES="4096")
    for run, (_, message) in zip(runs, cases, strict=True):
        assert run.returncode in (1, 2), (run.args, run.returncode, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and message in run.stderr, (run.args, run.stderr[-2000:])
    binary = next(r for r in runs if r.args[0] == "enqueue" and r.args[1].endswith(".bin"))
    assert "record longer than" in binary.stderr and "more rejected lines" in binary.stderr
    assert len(binary.stderr.splitlines()) < 60
    assert not outside(files_under(tmp_path) - before, cli_settings.data_dir)


def test_deadletter_commands_on_hostile_letters(cli_settings: Settings, redis_client: redis.Redis) -> None:
    letters = DeadLetters(redis_client, cli_settings.deadletter_path)
    hostile = letters.record(DeadLetter(task=jobs.infer_task, error=" | ".join(HOSTILE_TEXT), args=[[1, 2]]))
    unknown = letters.record(DeadLetter(task="[/]evil.task", error="x"))
    broken = redis_client.xadd(keys.deadletter_stream, {"letter": b"\xff{not json"}).decode()
    commands = [["deadletter", "list"], ["deadletter", "list", "--json"]]
    listed, as_json = run_many(cli_settings, commands, COLUMNS="300")  # rich: one line per letter
    assert listed.returncode == 0, listed.stderr
    assert "3 dead letters" in listed.stdout and "<unreadable>" in listed.stdout and "[/]evil.task" in listed.stdout
    assert " | ".join(SHOWN_AS) in listed.stdout  # literally
    assert not any(c in listed.stdout for c in CONTROLS)
    assert json.loads(as_json.stdout)[0]["error"] == " | ".join(HOSTILE_TEXT)  # --json: the same data, escaped
    assert not any(c in as_json.stdout for c in CONTROLS)
    (retried,) = run_many(cli_settings, [["deadletter", "retry", unknown or "", broken]])
    assert retried.returncode == 1 and "2 left in place" in retried.stderr and "Traceback" not in retried.stderr
    (dropped,) = run_many(cli_settings, [["deadletter", "drop", unknown or "", broken, hostile or ""]])
    assert dropped.returncode == 0 and "dropped 3 dead letters" in dropped.stdout
    with pytest.raises(ValueError):
        letters.get(["abc"])
    with pytest.raises(ValueError):
        letters.drop(["1-0", "abc"])


# -- L9: data on the terminal ---------------------------------------------------------------------------------------
def hostile_store(settings: Settings) -> MetadataStore:
    store = MetadataStore(settings.metadata_database)
    for k, text in enumerate(HOSTILE_TEXT):
        post = Post(id=f"p{k}", owner=Owner(id=f"u{k}", username=text), hashtags=["sushi"])
        store.upsert_posts([post])
        store.record_results([(post, None, Prediction(post_id=post.id, status="rejected", reason=text), None)])
        store.save_profile(Profile(user_id=f"u{k}", username=text, post_count=1, hashtags={"sushi": 0.5, text: 0.5}))
    return store


def test_query_user_and_audience_print_hostile_names_inert(cli_settings: Settings) -> None:
    store = hostile_store(cli_settings)
    everything = "".join(HOSTILE_TEXT) + "\x9b\x7f"
    store.save_profile(Profile(user_id="all", username=everything, hashtags={t: 0.1 for t in HOSTILE_TEXT}))
    user, audience = run_many(cli_settings, [["query", "user", "all"], ["query", "audience", "#sushi", "-k", "100"]])
    for run in (user, audience):
        assert run.returncode == 0, run.stderr
        assert not any(c in run.stdout for c in CONTROLS), repr(run.stdout)
    profile = json.loads(user.stdout)  # the same data, nothing lost
    assert profile["username"] == everything and set(profile["hashtags"]) == set(HOSTILE_TEXT)
    assert {u["username"] for u in json.loads(audience.stdout)["users"]} == set(HOSTILE_TEXT)


def render(renderable: object) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=400, emoji=False).print(renderable)
    return buffer.getvalue()


async def test_the_demo_summary_and_tables_show_hostile_text_literally(cli_settings: Settings) -> None:
    store = hostile_store(cli_settings)
    buffer = io.StringIO()
    await _print_summary(Console(file=buffer, width=400, emoji=False), store, 1.0)
    summary = buffer.getvalue()
    rows = [{"post_id": f"p{k}", "score": 0.5, "hashtags": [t], "owner": t, "faces": 0} for k, t in
            enumerate(HOSTILE_TEXT)]  # fmt: skip
    table = render(similar_table("GET /similar?post_id=[/]", rows))
    for out in (summary, table):
        assert not any(c in out for c in CONTROLS), repr(out)
        for text in SHOWN_AS:
            assert text in out, (text, out)


def test_the_terminal_helpers() -> None:
    for text, literal in zip(HOSTILE_TEXT, SHOWN_AS, strict=True):
        assert plain(text) == literal and render(shown(text)).rstrip("\n") == literal
        assert json.loads(json_text({"v": text})) == {"v": text}
        assert not any(c in json_text(text) for c in CONTROLS)
    assert plain("a\tb\nc\x00d\x7fe\x9bf\u2066g") == "a b cdefg"
    assert render(shown(":smile: \\[x]")).strip() == ":smile: \\[x]"
    assert POST_ID_RE.pattern == ID_PATTERN  # the CLI's copy of the rule pushed ids meet
