from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.records import Owner, Post, hashtags_in, normalise_hashtag, vector_id
from deeptarget.core.settings import Settings

PINNED_ID = 2211579637470149810


def test_hashtags_are_normalised_for_case_unicode_and_hash() -> None:
    assert normalise_hashtag("#Sushi") == "sushi"
    assert normalise_hashtag("＃ＳＵＳＨＩ") == "sushi"  # full-width forms fold under NFKC
    assert hashtags_in("Dinner #Sushi #sushi #ramen! #東京") == ["sushi", "ramen", "東京"]
    assert hashtags_in(None) == []


def test_vector_ids_are_stable_positive_int64_and_distinct() -> None:
    ids = {vector_id(str(17900000000000000 + i)) for i in range(10_000)}
    assert len(ids) == 10_000
    assert all(0 <= i < 2**63 for i in ids)
    # Pinned: ids live in snapshots and other hosts' stores, so the function must never change.
    assert vector_id("17900000000000000") == PINNED_ID


def test_engagement_is_likes_over_followers_and_unknown_without_either() -> None:
    owner = Owner(id="1", username="a", followers_count=2000)
    assert Post(id="p", like_count=50, owner=owner).engagement == pytest.approx(0.025)
    assert Post(id="p", like_count=50).engagement is None
    assert Post(id="p", owner=owner).engagement is None
    assert Post(id="p", like_count=5, owner=Owner(id="1", followers_count=0)).engagement is None


def test_posts_reject_negative_counts() -> None:
    with pytest.raises(ValidationError):
        Post(id="p", like_count=-1)


def test_settings_from_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "deeptarget.toml"
    toml.write_text('hashtags = ["#Sushi", "ramen"]\nbatch_size = 8\nbackbone = "resnet50"\n')
    monkeypatch.setenv("DEEPTARGET_BATCH_SIZE", "4")
    settings = Settings.load(toml)
    assert settings.hashtags == ["sushi", "ramen"]
    assert settings.batch_size == 4  # the environment overrides the file
    assert settings.backbone == "resnet50"


def test_loading_a_file_leaves_the_environment_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "deeptarget.toml"
    toml.write_text("batch_size = 8\n")
    monkeypatch.delenv("DEEPTARGET_CONFIG", raising=False)
    before = dict(os.environ)
    assert Settings.load(toml).batch_size == 8
    assert dict(os.environ) == before
    assert Settings().batch_size == 16  # the file was for that load only


def test_precedence_keywords_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "deeptarget.toml"
    toml.write_text("batch_size = 8\npage_size = 10\nsnapshots_kept = 5\n")
    monkeypatch.setenv("DEEPTARGET_BATCH_SIZE", "4")
    monkeypatch.setenv("DEEPTARGET_PAGE_SIZE", "12")
    settings = Settings.load(toml, batch_size=2)
    assert settings.batch_size == 2  # a keyword over the environment
    assert settings.page_size == 12  # the environment over the file
    assert settings.snapshots_kept == 5  # the file over the default
    assert settings.api_port == 8800  # the default


def test_a_path_given_to_load_wins_over_deeptarget_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named, given = tmp_path / "named.toml", tmp_path / "given.toml"
    named.write_text("batch_size = 5\npage_size = 7\n")
    given.write_text("batch_size = 9\n")
    monkeypatch.setenv("DEEPTARGET_CONFIG", str(named))
    assert Settings().batch_size == 5 and Settings.load().page_size == 7  # no path: DEEPTARGET_CONFIG's file
    settings = Settings.load(given)
    assert (settings.batch_size, settings.page_size) == (9, 25)  # that file only, not both
    assert os.environ["DEEPTARGET_CONFIG"] == str(named)


def test_loads_of_different_files_in_threads_do_not_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPTARGET_CONFIG", raising=False)
    files = []
    for n in range(1, 9):
        toml = tmp_path / f"settings{n}.toml"
        toml.write_text(f"batch_size = {n}\nsandbox_seed = {100 + n}\n")
        files.append(toml)
    start = threading.Barrier(len(files))

    def load_many(toml: Path) -> tuple[set[tuple[int, int]], set[str | None]]:
        start.wait()
        seen: set[tuple[int, int]] = set()
        named: set[str | None] = set()
        for _ in range(50):
            settings = Settings.load(toml)
            seen.add((settings.batch_size, settings.sandbox_seed))
            named.add(os.environ.get("DEEPTARGET_CONFIG"))  # what another thread's load would have put there
        return seen, named

    with ThreadPoolExecutor(len(files)) as pool:
        results = list(pool.map(load_many, files))
    assert [seen for seen, _ in results] == [{(n, 100 + n)} for n in range(1, 9)]
    assert all(named == {None} for _, named in results)
    assert "DEEPTARGET_CONFIG" not in os.environ


def test_each_setting_is_in_one_group_and_keeps_its_flat_variable_and_toml_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deeptarget.core import settings as module

    groups = [base for base in Settings.__mro__[1:] if base.__module__ == module.__name__]
    assert sorted(name for group in groups for name in group.__annotations__) == sorted(Settings.model_fields)
    assert all(group.__doc__ for group in groups)
    assert isinstance(Settings(), module.WorkerSettings)  # a stage may type its dependency as its group
    # One setting of each group from a DEEPTARGET_* variable, another from a top-level TOML key.
    variables = {"DATA_DIR": "elsewhere", "SOURCE_URL": "http://127.0.0.1:1", "TOKEN_CALLS": "7",
                 "HTTP_RETRIES": "1", "BATCH_SIZE": "3", "DECODE_THREADS": "3", "BACKBONE": "resnet50",
                 "FACE_POLICY": "off", "WORKER_CONCURRENCY": "2", "SNAPSHOTS_KEPT": "4", "ALS_FACTORS": "8",
                 "FOLLOWER_OUTLIER_K": "2.5", "API_PORT": "9000", "SANDBOX_SEED": "9"}  # fmt: skip
    for name, value in variables.items():
        monkeypatch.setenv(f"DEEPTARGET_{name}", value)
    toml = tmp_path / "deeptarget.toml"
    toml.write_text(
        'redis_url = "redis://127.0.0.1:1/0"\nhashtags = ["#A"]\nhashtag_quota = 3\nmax_image_bytes = 5\n'
        'ingest_block_s = 2.0\nmax_image_pixels = 9\ndevice = "cpu"\nface_min_size = 30\ntask_max_retries = 1\n'
        "index_ivf_from = 5000\nals_iterations = 2\nprofile_half_life_days = 3.0\napi_port = 1\nsandbox_posts = 5\n"
    )
    settings = Settings.load(toml)
    assert [getattr(settings, name.lower()) for name in variables] == [
        Path("elsewhere"), "http://127.0.0.1:1", 7, 1, 3, 3, "resnet50", "off", 2, 4, 8, 2.5, 9000, 9
    ]  # fmt: skip
    assert (settings.redis_url, settings.hashtags, settings.hashtag_quota, settings.max_image_bytes) == (
        "redis://127.0.0.1:1/0", ["a"], 3, 5
    )  # fmt: skip
    assert (settings.ingest_block_s, settings.max_image_pixels, settings.device, settings.face_min_size) == (
        2.0, 9, "cpu", 30
    )  # fmt: skip
    assert (settings.task_max_retries, settings.index_ivf_from, settings.als_iterations) == (1, 5000, 2)
    assert (settings.profile_half_life_days, settings.sandbox_posts) == (3.0, 5)


def test_settings_reject_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(batch_size=0)
    toml = tmp_path / "bad.toml"
    toml.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigurationError, match="no_such_setting: not a setting"):  # a command's error, named
        Settings.load(toml)


def test_secrets_never_show_in_repr_but_reach_child_processes() -> None:
    settings = Settings(access_tokens=[SecretStr("EAAB-very-secret")], api_key=SecretStr("k3y"))
    assert "EAAB-very-secret" not in repr(settings)
    assert "k3y" not in repr(settings)
    env = settings.to_env()
    assert "EAAB-very-secret" in env["DEEPTARGET_ACCESS_TOKENS"]


def test_a_database_url_is_a_secret_and_shown_without_its_password() -> None:
    settings = Settings(database_url="postgresql://deeptarget:pg-s3cret@db.internal:5432/deeptarget")
    assert "pg-s3cret" not in repr(settings) and "pg-s3cret" in settings.to_env()["DEEPTARGET_DATABASE_URL"]
    assert settings.metadata_database == "postgresql://deeptarget:pg-s3cret@db.internal:5432/deeptarget"
    assert settings.metadata_database_shown == "postgresql://deeptarget:***@db.internal:5432/deeptarget"
    assert Settings(data_dir=Path("d")).metadata_database == str(Path("d") / "metadata.sqlite3")


def test_settings_survive_the_trip_through_child_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(hashtags=["a", "b"], access_tokens=[SecretStr("t1"), SecretStr("t2")], batch_size=3)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert again.hashtags == ["a", "b"]
    assert [t.get_secret_value() for t in again.access_tokens] == ["t1", "t2"]
    assert again.batch_size == 3


def test_a_bad_record_in_a_task_batch_is_dropped_and_the_rest_go_on() -> None:
    from deeptarget.core.records import PostRef
    from deeptarget.workers.tasks import _valid

    records = [{"post": {"id": "1"}}, {"post": {"id": ""}}, {"nope": 1}, {"post": {"id": "2"}, "rejected": "x"}]
    assert [r.post.id for r in _valid(PostRef, records, "infer")] == ["1", "2"]
