"""Which task failures are worth waiting out, and how long to wait.

A failure is transient when the same call may work later without anyone changing the input: the store, the broker or
the blob store briefly away, the GPU full, or the disk in a state that passes (full, over quota, an I/O error, out of
file handles). Everything else (a bug, a permission, a missing file) fails the task for good: a dead letter.

Disk failures wait longer (``task_retry_disk_backoff_s``, doubling): a full disk takes minutes to clear, and retrying
every few seconds only turned each retry into another dead letter (issue 13, item 7).
"""

from __future__ import annotations

import redis
from kombu.exceptions import OperationalError

from deeptarget.core.errors import PASSING_DISK_ERRNOS, TransientError
from deeptarget.store.databases import TRANSIENT_DB_ERRORS

DISK_ERRNOS = PASSING_DISK_ERRNOS
"""OSError codes after which the same write may succeed later. Not here, so permanent: EACCES, EPERM, ENOENT,
ENOTDIR, EISDIR, EROFS, EINVAL, ENAMETOOLONG... (someone must change something first)."""

_SERVICES = (*TRANSIENT_DB_ERRORS, redis.ConnectionError, redis.TimeoutError, OperationalError, TransientError)
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError)
"""What a send raises while Redis (the broker) cannot be reached."""


def is_disk_error(err: BaseException) -> bool:
    """A transient OSError of the disk kind (full, quota, I/O error, handles)."""
    return isinstance(err, OSError) and not isinstance(err, ConnectionError) and err.errno in DISK_ERRNOS


def is_transient(err: BaseException) -> bool:
    """Worth retrying the same task later (see the module's docstring)."""
    if isinstance(err, _SERVICES):
        return True
    if isinstance(err, ConnectionError | TimeoutError):  # sockets: refused, reset, timed out
        return True
    return is_disk_error(err)


def retry_delay_s(
    err: BaseException, retries: int, base_s: float, disk_base_s: float, max_s: float, visibility_timeout_s: float
) -> float:
    """The upper bound of the next retry's delay (callers add jitter): doubling from the base of the failure's kind,
    capped at ``max_s`` and at half the visibility timeout (Redis holds a task waiting for its countdown unacked: one
    waiting longer than the visibility timeout is delivered a second time, Celery's "Redis caveats")."""
    base = disk_base_s if is_disk_error(err) else base_s
    return min(max_s, visibility_timeout_s / 2, base * 2.0**retries)
