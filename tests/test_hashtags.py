from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeptarget.core.errors import ModelFitError, ModelNotReadyError
from deeptarget.models.hashtags import HashtagModel

BLOCKS = {
    "food": ["sushi", "ramen", "foodie", "dinner"],
    "cars": ["porsche", "supercar", "carsofinstagram", "drive"],
    "pets": ["dog", "puppy", "cute", "pets"],
}


def synthetic(n_per_block: int = 60, seed: int = 0) -> tuple[np.ndarray, list[list[str]], dict[str, list[int]]]:
    """Images in three topics, each tagged with 2-3 of its topic's hashtags (and rarely one from another topic)."""
    rng = np.random.default_rng(seed)
    ids, tags, members = [], [], {}
    for b, (block, vocabulary) in enumerate(BLOCKS.items()):
        members[block] = []
        for i in range(n_per_block):
            vid = 10_000 * (b + 1) + i
            chosen = list(rng.choice(vocabulary, size=int(rng.integers(2, 4)), replace=False))
            if rng.random() < 0.05:
                chosen.append(str(rng.choice([t for tags in BLOCKS.values() for t in tags])))
            ids.append(vid)
            tags.append(chosen)
            members[block].append(vid)
    return np.array(ids, np.int64), tags, members


@pytest.fixture(scope="module")
def model() -> HashtagModel:
    ids, tags, _ = synthetic()
    return HashtagModel.fit(ids, tags, factors=8, iterations=15)


def test_neighbours_from_one_topic_get_that_topics_hashtags(model: HashtagModel) -> None:
    _, _, members = synthetic()
    for block, vocabulary in BLOCKS.items():
        neighbours = np.array(members[block][:10])
        top = [t for t, _ in model.suggest(neighbours, n=4)]
        assert set(top) == set(vocabulary), (block, top)


def test_stop_hashtags_are_never_suggested(model: HashtagModel) -> None:
    _, _, members = synthetic()
    top = [t for t, _ in model.suggest(np.array(members["food"][:10]), n=4, exclude=["sushi"])]
    assert "sushi" not in top and len(top) == 4


def test_unknown_neighbours_are_ignored_and_none_known_is_an_error(model: HashtagModel) -> None:
    _, _, members = synthetic()
    with_unknown = np.array([*members["pets"][:5], 999_999_999])
    assert {t for t, _ in model.suggest(with_unknown, n=4)} == set(BLOCKS["pets"])
    with pytest.raises(ModelNotReadyError):
        model.suggest(np.array([1, 2, 3]))


def test_models_are_versioned_on_disk(tmp_path: Path, model: HashtagModel) -> None:
    with pytest.raises(ModelNotReadyError):
        HashtagModel.load(tmp_path)
    assert model.save(tmp_path) == 1
    assert model.save(tmp_path) == 2
    loaded = HashtagModel.load(tmp_path)
    assert loaded.version == 2 and loaded.hashtags == model.hashtags
    np.testing.assert_array_equal(loaded.image_factors, model.image_factors)


def test_nothing_to_fit_is_a_named_error() -> None:
    with pytest.raises(ModelFitError):
        HashtagModel.fit(np.array([1, 2]), [[], []])
