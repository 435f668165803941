from __future__ import annotations

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
