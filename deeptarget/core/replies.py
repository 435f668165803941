"""What a redis-py command returns, typed as what it is.

redis-py annotates each command once for its two clients, so ``hincrby`` returns ``Awaitable[int] | int`` on both
``redis.Redis`` and ``redis.asyncio.Redis`` (redis/redis-py#2399, #3195; 7.x still has no overloads per client).
mypy then refuses ``await client.hincrby(...)`` and ``int(client.xdel(...))`` alike. The two functions below say which
of the two it is at the one place it is known, the call: ``await deferred(redis.sadd(key, member))`` for the asyncio
client, ``at_once(client.xrange(stream))`` for the blocking one. They change nothing at run time. Commands annotated
``ResponseT`` (``Awaitable[Any] | Any``, e.g. ``get``, ``xadd``) await as they are and need neither. redis-py also
types text replies as ``str``, which they are only with ``decode_responses``; ours are ``bytes``, so readers keep their
``isinstance(value, bytes)``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


def deferred(reply: Awaitable[T] | T) -> Awaitable[T]:
    """A ``redis.asyncio`` command's reply: always the awaitable."""
    return cast("Awaitable[T]", reply)


def at_once(reply: Awaitable[T] | T) -> T:
    """A blocking ``redis.Redis`` command's reply: always the value."""
    return cast("T", reply)
