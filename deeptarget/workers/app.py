"""The Celery application, built from Settings (no module-level app: ``deeptarget worker`` builds it and runs it).

Delivery is at-least-once with idempotent tasks: ``acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1, so a
task whose worker dies is delivered again, and every task overwrites rather than appends. JSON only, never pickle.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from deeptarget import constants
from deeptarget.config import Settings
from deeptarget.errors import ConfigurationError


def create_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise ConfigurationError("the Celery app needs settings.redis_url (resolve the embedded Redis first)")
    app = Celery("deeptarget", broker=settings.redis_url, include=["deeptarget.workers.tasks"])
    transport = {
        # Unacked tasks come back after this long; it must exceed the longest task or tasks run twice.
        "visibility_timeout": settings.visibility_timeout_s,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in constants.all_queues],
        task_default_queue=constants.infer_queue,
        task_routes={name: {"queue": queue} for name, queue in constants.task_queues.items()},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "refit-hashtag-model": {"task": constants.train_task, "schedule": settings.train_every_s},
            # A safety net only: the index writer publishes its changes within snapshot_every_s by itself.
            "flush-index-snapshot": {
                "task": constants.snapshot_task,
                "schedule": max(settings.snapshot_every_s, 10.0),
                "kwargs": {"if_changed": True},
            },
        },
    )
    app.deeptarget_settings = settings  # type: ignore[attr-defined]
    return app


def settings_of(app: Celery) -> Settings:
    settings = getattr(app, "deeptarget_settings", None)
    if settings is None:
        raise ConfigurationError("this Celery app was not built by deeptarget.workers.app.create_celery")
    return settings
