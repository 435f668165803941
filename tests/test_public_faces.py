"""The packages a notebook imports (issue 14): each names its public parts in ``__all__``, every one resolves, and
none needs Celery. Each check runs in a fresh interpreter (no Redis, no Celery worker, no ``DEEPTARGET_*`` setting),
so that what one import loads is not hidden by what an earlier test loaded here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The faces a notebook uses (ARCHITECTURE.md: "deeptarget.query.QueryService, deeptarget.models and deeptarget.index
# for notebooks"), and the store beside them.
FACES = ["deeptarget.models", "deeptarget.index", "deeptarget.query", "deeptarget.store"]
HEAVY = ["torch", "torchvision", "faiss", "cv2", "celery", "kombu"]
LIGHT = [*FACES, "deeptarget.models.heads", "deeptarget.models.decode", "deeptarget.scraper"]

RESOLVE_ALL = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    exported = getattr(package, "__all__", None)
    unresolved = [n for n in exported or () if getattr(package, n, None) is None]
    out[name] = {
        "all": exported,
        "unresolved": unresolved,
        "missing_from_dir": sorted(set(exported or ()) - set(dir(package))),
        "celery": sorted(m for m in ("celery", "kombu") if m in sys.modules),
    }
print(json.dumps(out))
"""

IMPORT_ONLY = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""


def python(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter from the repository root; its stdout, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPTARGET_")}
    env["DEEPTARGET_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there: an import that connects fails
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_exported_name_resolves_and_none_needs_celery() -> None:
    report = python(RESOLVE_ALL, *FACES)
    for name in FACES:
        face = report[name]
        assert face["celery"] == [], f"{name} imports {face['celery']}"
        if name == "deeptarget.store" and face["all"] is None:
            continue  # its __all__ is being written elsewhere: importable, without Celery, is what holds here
        assert face["all"], f"{name} has no __all__"
        assert len(face["all"]) == len(set(face["all"])), f"{name}.__all__ repeats a name"
        assert face["unresolved"] == [], f"{name} cannot give {face['unresolved']}"
        assert face["missing_from_dir"] == [], f"dir({name}) lacks {face['missing_from_dir']}"


@pytest.mark.parametrize("name", LIGHT)
def test_importing_a_package_or_a_light_submodule_loads_no_torch_or_faiss(name: str) -> None:
    """Names are imported on first use: the packages themselves, the CLI's name checks (``models.heads``) and the
    scraper load none of the heavy libraries (the scraper alone sends tasks, so it may load Celery)."""
    heavy = [m for m in HEAVY if name != "deeptarget.scraper" or m not in ("celery", "kombu")]
    assert python(IMPORT_ONLY, name, *heavy) == []


def test_the_store_loads_no_redis_and_its_blobs_no_database_driver() -> None:
    """What ``deeptarget/store/__init__.py`` promises: no Redis for the store, no driver for the scraper's blobs."""
    assert python(IMPORT_ONLY, "deeptarget.store", "redis") == []
    assert python(IMPORT_ONLY, "deeptarget.store.blobs", "sqlite3", "psycopg") == []


def test_the_lazy_names_are_the_real_ones_and_stay_put() -> None:
    import deeptarget.index
    import deeptarget.models
    import deeptarget.query
    from deeptarget.index.writer import IndexWriter
    from deeptarget.models.embedder import Embedder
    from deeptarget.query.service import QueryService

    assert deeptarget.models.Embedder is Embedder and "Embedder" in vars(deeptarget.models)
    assert deeptarget.index.IndexWriter is IndexWriter and deeptarget.query.QueryService is QueryService
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        deeptarget.models.Nothing  # noqa: B018
    for package in (deeptarget.models, deeptarget.index, deeptarget.query):
        assert sorted(package.__all__) == sorted(package._EXPORTS), package.__name__
