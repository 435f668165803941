"""The Celery application, built from Settings (no module-level app: ``deeptarget worker`` builds it and runs it).

Delivery is at-least-once with idempotent tasks: ``acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1, so a
task whose worker dies is delivered again, and every task overwrites rather than appends. JSON only, never pickle.

How soon "again" is (issue 13, item 4). Redis has no acknowledgement of its own: kombu keeps each delivered message in
an ``unacked`` hash and sorted set, and a consumer moves the ones older than ``visibility_timeout`` back to their queue
("the visibility timeout defines the number of seconds to wait for the worker to acknowledge the task before the
message is redelivered to another worker", https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/
redis.html#visibility-timeout; kombu/transport/redis.py ``QoS``). Kombu looks only every
``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (10 x 10 by default); here every
``redelivery_check_s``. So a task a killed worker held runs again within ``visibility_timeout_s + redelivery_check_s``
(300 + 5 s by default; it was an hour). A task that outlives the visibility timeout while its worker lives is
delivered a second time too (Celery's "Redis caveats"): the long ones (a rebuild, a hashtag refit at scale) are
idempotent, and a copy delivered after the first finished is skipped (``tasks.PipelineTask``). Retry countdowns stay
under half the visibility timeout for the same reason (a message waiting for its ETA is unacked).

On a lost broker connection a running task goes on (``worker_cancel_long_running_tasks_on_connection_loss`` off, as
Celery 5 defaults: cancelling would throw away an embedded batch whose store write is its journal); its
acknowledgement may then fail ("these tasks cannot be acknowledged as the connection is gone, and the tasks are
automatically redelivered back to the queue", celery/worker/consumer/consumer.py, celery/celery#6654), and Redis
delivers it again after the visibility timeout, where the done mark skips it. ``broker_connection_retry_on_startup``
and ``broker_connection_max_retries=None``: a worker waits for Redis however long it is away, at start or later.
"""

from __future__ import annotations

from celery import Celery

from deeptarget import jobs
from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings


def create_celery(settings: Settings, *, warm_infer: bool = False) -> jobs.DeeptargetCelery:
    """The worker's app: the senders' (``jobs.sending_app``: broker, JSON, routes) plus delivery settings, the beat
    schedule and the task bodies."""
    app = jobs.sending_app(settings, warm_infer=warm_infer, include=["deeptarget.workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,  # a worker started while Redis is down waits for it
        broker_connection_max_retries=None,  # and one that lost it waits as long as it takes (default: 100 tries)
        worker_cancel_long_running_tasks_on_connection_loss=False,  # see the module's docstring
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "refit-hashtag-model": {"task": jobs.train_task, "schedule": settings.train_every_s},
            # A safety net only: the index writer publishes its changes within snapshot_every_s by itself.
            "flush-index-snapshot": {
                "task": jobs.snapshot_task,
                "schedule": max(settings.snapshot_every_s, 10.0),
                "kwargs": {"if_changed": True},
            },
        },
    )
    return app


def settings_of(app: Celery) -> Settings:
    if not isinstance(app, jobs.DeeptargetCelery):
        raise ConfigurationError("this Celery app was not built by deeptarget.workers.app.create_celery")
    return app.settings
