"""The kernel every stage shares: the records that cross process boundaries, errors, Redis key names, settings.

Nothing here imports another part of deeptarget, torch, Celery or Redis."""
