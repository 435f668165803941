"""A worker's Prometheus metrics, summed over its pool processes (prometheus_client's multiprocess mode).

Celery's prefork children count posts, retries and dead letters in their own memory, which no single process could
serve. In multiprocess mode each process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and the worker's
main process serves their sum. The variable must be set before prometheus_client is first imported, so
``serve_worker_metrics`` runs before the Celery app and its tasks are imported."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings

LOG = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve_worker_metrics(settings: Settings, worker_name: str) -> Path | None:
    """Serve ``/metrics`` on ``worker_metrics_port`` when set; returns the folder the processes write to."""
    if not settings.worker_metrics_port:
        return None
    if "prometheus_client" in sys.modules:
        raise ConfigurationError("worker metrics must be set up before prometheus_client is imported")
    folder = settings.data_dir / "metrics" / worker_name
    shutil.rmtree(folder, ignore_errors=True)  # values of an earlier run would be summed in
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
    start_http_server(settings.worker_metrics_port, addr=settings.api_host, registry=registry)
    LOG.info("worker metrics on http://%s:%d/metrics", settings.api_host, settings.worker_metrics_port)
    return folder


def forget_process(pid: int) -> None:
    """A pool process exited: its live gauges stop counting (its counters stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
