"""Exceptions raised by deeptarget.

    DeepTargetError
     +-- ConfigurationError      settings that cannot work (missing weights file, bad URL scheme)
     +-- ModelFetchError         `deeptarget models fetch` could not fetch or verify a model file (names it and why)
     +-- SourceError             a source answered something unusable
     |    +-- GraphApiError       the Graph API returned an error object (carries its code)
     +-- CrawlStopped            a stop was requested: the crawl winds down (not a failure)
     +-- ImageRejected           one image cannot be used; carries a short machine-readable reason
     +-- IndexMismatchError      embeddings from a different backbone/weights than the index holds
     +-- ModelNotReadyError      a query needs a model or index that has not been built yet
     +-- ModelFitError           model fitting produced unusable factors (NaN)
     +-- NotFoundError           a query named a post or user the system does not know
     +-- TransientError          worth retrying the whole task later (with backoff; then the dead-letter stream)
          +-- BlobStoreUnavailable  the blob store could not be read (I/O error, unmounted volume), not a missing blob
          +-- ResourceExhausted     out of (GPU) memory even for a single image

Per-item failures (one bad image) are data: they end as a rejected post with a reason. Exceptions that escape a task
are task-level failures that Celery may retry.
"""

from __future__ import annotations

import errno

PASSING_DISK_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,  # no space left
        errno.EDQUOT,  # over quota
        errno.EIO,  # an I/O error: a flaky disk or network volume
        errno.ENFILE,  # the system is out of file handles
        errno.EMFILE,  # this process is
        errno.ENOMEM,
        errno.ENOLCK,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ENOTCONN,  # a network or FUSE volume whose server went away
        getattr(errno, "ESTALE", None),  # an NFS handle that the server forgot
    )
    if code is not None
)
"""OSError codes of a disk in a state that passes: the same write may succeed later with nothing changed. The
workers retry these (``workers/transient.py``); the scraper's blob store waits out these and a few more
(``blobs.OUTAGE_ERRNOS``)."""


class DeepTargetError(Exception):
    """Base class of every deeptarget error."""


class ConfigurationError(DeepTargetError):
    pass


class ModelFetchError(DeepTargetError):
    """One model file not fetched: the message is one line naming the file and the reason."""


class SourceError(DeepTargetError):
    pass


class GraphApiError(SourceError):
    def __init__(self, message: str, *, code: int | None = None, status: int | None = None) -> None:
        super().__init__(f"{message} (code={code}, http={status})")
        self.code = code
        self.status = status


class CrawlStopped(DeepTargetError):
    """A stop was requested while the crawl waited (for a token, a retry, a download): nothing new starts."""


class ImageRejected(DeepTargetError):
    """An image that cannot be used. ``reason`` is short and stable (it is counted), ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class IndexMismatchError(DeepTargetError):
    pass


class ModelNotReadyError(DeepTargetError):
    pass


class ModelFitError(DeepTargetError):
    pass


class NotFoundError(DeepTargetError, LookupError):
    pass


class TransientError(DeepTargetError):
    pass


class BlobStoreUnavailable(TransientError):
    pass


class ResourceExhausted(TransientError):
    pass
