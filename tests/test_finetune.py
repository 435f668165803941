"""train-head --finetune on the colour dataset the tests make: the head it writes is what the workers would compute,
and a run killed after a checkpoint resumes from it.

The backbone is random, but not ``weights = none``: a random MobileNetV2 with BatchNorm's default statistics
(mean 0, variance 1) shrinks activations to ~1e-8 by its last layer, and after the L2 normalisation any step, even
at lr 1e-6, swamps them. The tests calibrate the statistics on noise first (as pretrained weights have them), save
the state dict, and load it as a weights file, like a user's own weights."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deeptarget.models.embedder import Embedder
from deeptarget.models.heads import LinearHead, head_versions
from deeptarget.training.datasets import load_labelled
from deeptarget.training.finetune import FinetuneOptions, finetune
from deeptarget.training.train_head import embed_files
from tests.conftest import make_settings
from tests.helpers import calibrated_random_weights, make_dataset

pytestmark = pytest.mark.timeout(300)

OPTIONS = FinetuneOptions(epochs=2, batch_size=8, loader_workers=0)


def test_a_finetuned_head_is_the_one_the_workers_would_compute(tmp_path: Path) -> None:
    make_dataset(tmp_path / "photos", per_class=20)
    settings = make_settings(tmp_path / "data", weights=str(calibrated_random_weights(tmp_path / "random.pth")))
    trained = finetune(settings, tmp_path / "photos", "colour", OPTIONS)
    m = trained.metrics
    assert m["top1"] >= 0.6 and m["top1_tta"] >= 0.6  # chance is 1/3
    assert {"top1_linear_probe", "macro_f1_tta"} <= set(m)
    assert trained.head.version == 1 and head_versions(settings.heads_dir, "colour").current() is None
    assert not (settings.finetune_dir / "colour" / "checkpoint.pt").exists()  # done: nothing left to resume

    # The saved backbone loads like any weights file; with the saved head it predicts what the run reported.
    backbone = settings.finetune_dir / "colour" / "v1-backbone.pth"
    served = Embedder("mobilenet_v2", str(backbone), "imagenet", settings.image_size, "cpu")
    head = LinearHead.load(head_versions(settings.heads_dir, "colour").path(1))
    assert head.model_id == served.model_id != Embedder.from_settings(settings).model_id
    data = load_labelled(tmp_path / "photos")
    vectors, usable = embed_files(settings, served, [p for p, _ in data.test])
    labels = np.array([y for (_, y), ok in zip(data.test, usable, strict=True) if ok])
    assert (head(vectors).argmax(1) == labels).mean() == pytest.approx(m["top1"], abs=1e-9)

    page = trained.report_path.read_text()
    assert "learning_curves.png" in page and "held out, TTA" not in page  # the page shows the TTA metrics table
    assert (trained.report_path.parent / "embedding_map.png").is_file()


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_dataset(tmp_path / "photos", per_class=16)
    settings = make_settings(tmp_path / "data", weights=str(calibrated_random_weights(tmp_path / "random.pth")))
    checkpoint = settings.finetune_dir / "colour" / "checkpoint.pt"
    command = [sys.executable, "-m", "deeptarget", "train-head", str(tmp_path / "photos"), "--name", "colour",
               "--finetune", "--epochs", "4", "--batch-size", "8"]  # fmt: skip
    env = {**os.environ, **settings.to_env()}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()

    options = FinetuneOptions(epochs=4, batch_size=8, loader_workers=0)  # what the command line ran with
    with caplog.at_level(logging.INFO, logger="deeptarget.training.finetune"):
        finetune(settings, tmp_path / "photos", "colour", options)
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resumed and "of 4" in resumed[0]
    history_rows = (settings.reports_dir / "head-colour-v1" / "index.html").read_text()
    assert "learning_curves" in history_rows
