from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_worker_concurrency_comes_from_settings_and_the_index_queue_refuses_more_than_one(
    tmp_path: Path, redis_url: str
) -> None:
    env = {**os.environ, "DEEPTARGET_REDIS_URL": redis_url, "DEEPTARGET_DATA_DIR": str(tmp_path),
           "DEEPTARGET_WORKER_CONCURRENCY": "2"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "deeptarget", "worker", "--queues", "index"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "exactly one consumer" in done.stderr
