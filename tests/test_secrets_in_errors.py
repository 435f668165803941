"""Secrets never show in errors (issue 12, L4): a malformed database or Redis URL, or a mistyped or mistaken secret
setting in the TOML file or the environment, gives an error that names the setting and the problem, and shows a URL
only with its password replaced by ***. Each case runs the real command, ``python -m deeptarget ...``."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings, passwords_in, redacted, without_password

SECRET = "s3cretPW"  # in every case below; it must appear nowhere in what the command prints


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    env: dict[str, str]
    says: tuple[str, ...]  # what the error must say (the setting, the problem, the URL without its password)
    toml: str | None = None  # the settings file's text, given with --config (or DEEPTARGET_CONFIG when env says so)


def export(url: str, *says: str) -> Case:
    return Case(("profiles", "export", "out.jsonl"), {"DEEPTARGET_DATABASE_URL": url}, says)


def enqueue(url: str, *says: str) -> Case:
    return Case(("enqueue", "posts.jsonl"), {"DEEPTARGET_REDIS_URL": url}, says)


def copy_to(url: str, *says: str) -> Case:
    return Case(("store-copy", "--to", url), {}, says)


def toml(text: str, *says: str, env: dict[str, str] | None = None) -> Case:
    return Case(("query", "similar", "--post-id", "p1"), env or {}, says, toml=text)


# Run as commands: one of each kind of failure (the settings, the store, libpq, Redis, the TOML file, a variable).
CASES = {
    "db-port-not-a-number": export(f"postgresql://user:{SECRET}@host:notaport/db", "database_url: the port",
                                   "postgresql://user:***@host:notaport/db"),
    "db-unclosed-ipv6": export(f"postgresql://user:{SECRET}@[bad/db", "database_url: not a URL",
                               "postgresql://user:***@[bad/db"),
    "db-unknown-scheme": export(f"mysql://user:{SECRET}@host/db", "database_url: unknown scheme 'mysql'",
                                "mysql://user:***@host/db"),
    # what only libpq finds wrong: it quotes the URL, and the message is redacted
    "db-libpq-quotes-it": export(f"postgresql://user:{SECRET}@[::1]x/db", "metadata store: unexpected character",
                                 "postgresql://user:***@[::1]x/db"),
    "db-refused": export(f"postgresql://user:{SECRET}@127.0.0.1:1/db", "Connection refused"),
    # store-copy --to takes a URL the settings never checked: the store checks it
    "copy-unknown-scheme": copy_to(f"sqlite://user:{SECRET}@host/db", "metadata store sqlite://user:***@host/db",
                                   "unknown scheme 'sqlite'"),
    "copy-libpq-quotes-it": copy_to(f"postgresql://u:{SECRET}@[::1]x/db", "postgresql://u:***@[::1]x/db"),
    # redis_url (the Celery broker's too)
    "redis-port-not-a-number": enqueue(f"redis://:{SECRET}@host:notaport/0", "redis_url: the port",
                                       "redis://:***@host:notaport/0"),
    "redis-unknown-scheme": enqueue(f"http://:{SECRET}@host/0", "redis_url: unknown scheme 'http'"),
    "redis-refused": enqueue(f"redis://:{SECRET}@127.0.0.1:1/0", "Error 111"),
    # the TOML file, by --config and by DEEPTARGET_CONFIG; a variable that is no JSON
    "toml-misspelt-url": toml(f'databse_url = "postgresql://u:{SECRET}@h/db"\n', "databse_url: not a setting"),
    "toml-tokens-not-a-list": toml(f'access_tokens = "{SECRET}"\n', "access_tokens: Input should be a valid list"),
    "toml-by-variable": toml(f'api_kye = "{SECRET}"\n', "api_kye: not a setting",
                             env={"DEEPTARGET_CONFIG": "settings.toml"}),
    "env-tokens-not-json": Case(("query", "similar", "--post-id", "p1"), {"DEEPTARGET_ACCESS_TOKENS": f"[{SECRET}"},
                                ('field "access_tokens"',)),
}  # fmt: skip

# The same path in one process (Settings.load, as every command starts): (variables, TOML text, what it must say).
SETTINGS_CASES = {
    "db-port-out-of-range": ({"DEEPTARGET_DATABASE_URL": f"postgresql://user:{SECRET}@host:99999/db"}, None,
                             "database_url: the port"),
    "db-no-slashes": ({"DEEPTARGET_DATABASE_URL": f"postgresql:user:{SECRET}@host/db"}, None,
                      "database_url: not a URL"),
    "db-no-scheme": ({"DEEPTARGET_DATABASE_URL": f"user:{SECRET}@host/db"}, None, "(in user:***@host/db)"),
    "db-slash-in-password": ({"DEEPTARGET_DATABASE_URL": f"postgresql://user:{SECRET}/x@host/db"}, None,
                             "database_url: an '@' after the host"),
    "db-bad-percent": ({"DEEPTARGET_DATABASE_URL": f"postgresql://user:{SECRET}%zz@host/db"}, None,
                       "database_url: a '%' that is no"),
    "db-control-char": ({"DEEPTARGET_DATABASE_URL": f"postgresql://user:{SECRET}@host/db\x1b"}, None,
                        "database_url: spaces or control"),
    "redis-slash-in-password": ({"DEEPTARGET_REDIS_URL": f"redis://:{SECRET}/x@host:6379/0"}, None,
                                "redis_url: an '@' after the host"),
    "redis-unclosed-ipv6": ({"DEEPTARGET_REDIS_URL": f"redis://:{SECRET}@[bad/0"}, None, "redis_url: not a URL"),
    "redis-no-scheme": ({"DEEPTARGET_REDIS_URL": f":{SECRET}@host:6379"}, None, "(in :***@host:6379)"),
    "redis-no-host": ({"DEEPTARGET_REDIS_URL": f"redis://:{SECRET}@:6379/0"}, None, "redis_url: the URL has no host"),
    "toml-misspelt-key": ({}, f'api_kye = "{SECRET}"\n', "api_kye: not a setting"),
    "toml-misspelt-tokens": ({}, f'acces_tokens = ["{SECRET}"]\n', "acces_tokens: not a setting"),
    "toml-key-not-a-string": ({}, "api_key = 31415926535897932\n", "api_key: Input should be a valid string"),
    "toml-app-tokens-not-a-list": ({}, f'token_apps = {{ app = "{SECRET}" }}\n', "token_apps.app: Input should be"),
    "toml-url-not-a-string": ({}, f'redis_url = ["redis://:{SECRET}@h/0"]\n', "redis_url: Input should be a valid"),
    "toml-bad-url": ({}, f'database_url = "postgresql://u:{SECRET}@h:x/db"\n', "database_url: the port"),
    "toml-not-toml": ({}, f'api_key = "{SECRET}\n', "is not TOML"),
    "env-app-tokens-wrong-type": ({"DEEPTARGET_TOKEN_APPS": f'{{"app": "{SECRET}"}}'}, None, "token_apps.app"),
}  # fmt: skip


def run(case: Case, folder: Path) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    (folder / "posts.jsonl").write_text('{"id": "p1", "media_url": "https://cdn.example/1.jpg"}\n')
    args = list(case.args)
    if case.toml is not None:
        (folder / "settings.toml").write_text(case.toml)
        if "DEEPTARGET_CONFIG" not in case.env:
            args = ["--config", "settings.toml", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPTARGET_")}
    env |= {"DEEPTARGET_DATA_DIR": str(folder / "data"), **case.env}
    return subprocess.run([sys.executable, "-m", "deeptarget", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every case run once, a few at a time (each is a process of its own)."""
    root = tmp_path_factory.mktemp("secrets")
    with ThreadPoolExecutor(4) as pool:
        done = pool.map(lambda name: (name, run(CASES[name], root / name)), CASES)
        return {name: (result, root / name) for name, result in done}


@pytest.mark.parametrize("name", CASES)
def test_an_error_names_the_problem_and_never_the_secret(name: str, outcomes) -> None:  # type: ignore[no-untyped-def]
    result, folder = outcomes[name]
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown
    assert SECRET not in shown, shown
    for words in CASES[name].says:
        assert words in shown, shown
    # Nothing was made of the URL either (a mysql:// URL was once taken for a SQLite path, password and all).
    assert not [p for p in folder.rglob("*") if SECRET in str(p)]


@pytest.mark.parametrize("name", SETTINGS_CASES)
def test_a_settings_error_names_the_setting_and_never_the_secret(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variables, text, says = SETTINGS_CASES[name]
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    path = None
    if text is not None:
        path = tmp_path / "settings.toml"
        path.write_text(text)
    with pytest.raises(ConfigurationError) as raised:
        Settings.load(path)
    assert SECRET not in str(raised.value) and says in str(raised.value), str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # nothing chained carries the input


def test_settings_errors_are_errors_not_tracebacks(outcomes) -> None:  # type: ignore[no-untyped-def]
    for name in CASES:
        result, _ = outcomes[name]
        if "refused" not in name:  # a database or Redis that is down is not a settings problem
            assert "Traceback" not in result.stderr and result.stderr.startswith("deeptarget: error: "), result.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://user:{SECRET}@host:notaport/db",
        f"postgresql://user:{SECRET}@[bad/db",
        f"postgresql://user:{SECRET}/x@host/db",
        f"postgresql://user:{SECRET}@x@host/db",
        f"postgresql:user:{SECRET}@host/db",
        f"user:{SECRET}@host/db",
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        f"unix:///tmp/redis.sock?db=0&password={SECRET}",
        f"postgresql://user@host/db?sslmode=require&PASSWORD={SECRET}",
    ],
)
def test_a_url_is_shown_without_its_password_however_malformed(url: str) -> None:
    assert SECRET not in without_password(url) and "***" in without_password(url)
    assert SECRET in "".join(passwords_in(url))
    quoted = f'libpq: bad URI "{url}", near "{SECRET}"'
    assert SECRET not in redacted(quoted, url)


def test_what_has_no_password_is_shown_as_it_is() -> None:
    for location in ("data/metadata.sqlite3", "/var/lib/deeptarget/metadata.sqlite3", "postgresql://db.internal/dt",
                     "postgresql://user@db.internal:5432/dt", "redis://127.0.0.1:6379/0"):  # fmt: skip
        assert without_password(location) == location and passwords_in(location) == []
