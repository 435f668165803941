"""Where the scraper may fetch from (issue 12, H1: pushed posts, feeds and source pages name any URL they like).

Two checks, as trusted fetchers make them:

- **the URL**, before a request and again at every redirect hop: http(s) with a host and a valid port, no
  ``user:pw@``; the host is one the operator named (the source's, a feed's, an ``image_hosts`` entry with a port or
  an IP), or matches an ``image_hosts`` pattern (``*.cdninstagram.com``) on port 80 or 443; a literal IP must be a
  public address unless it was named;
- **the address connected to**: ``PublicResolver`` resolves names and drops every loopback, private, link-local,
  CGNAT, multicast or reserved address, unless the host was named. It runs when the connection is made, so a name
  that resolves to a public address for the check and to 127.0.0.1 for the connection (DNS rebinding) gets nowhere.

A refusal says only that the host is not allowed: never which ports answered.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from deeptarget.core.settings import Settings

PUBLIC_PORTS = frozenset({80, 443})


class NotPublicAddress(OSError):
    """The name resolves to no address the scraper may connect to."""


class FetchRefused(ValueError):
    """A URL the policy does not allow; the message names the rule, never what the network answered."""


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchRefused("only http(s) URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("no user:password@ in image URLs")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise FetchRefused("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise FetchRefused("the URL's port is not valid") from err
    if not 0 < port < 65536:
        raise FetchRefused("the URL's port is not valid")
    return host, port


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class FetchPolicy:
    named: frozenset[tuple[str, int]] = frozenset()  # host, port the operator configured: private addresses allowed
    patterns: tuple[str, ...] = ()  # image host patterns, public addresses on ports 80/443 only

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        named: set[tuple[str, int]] = set()
        patterns: list[str] = []
        for url in [settings.source_url, *settings.jsonl_feeds]:
            try:
                named.add(_host_port(url))
            except FetchRefused:
                continue
        for entry in settings.image_hosts:
            entry = entry.strip().lower()
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if port.isdigit():
                named.add((host, int(port)))
            elif _literal_ip(entry) is not None:
                named.update((entry.strip("[]"), p) for p in PUBLIC_PORTS)
            elif entry:
                patterns.append(entry)
        return cls(frozenset(named), tuple(patterns))

    def check(self, url: str) -> None:
        """Raises ``FetchRefused`` unless ``url`` may be fetched (the connection is checked again, see the module)."""
        host, port = _host_port(url)
        if (host, port) in self.named:
            return
        literal = _literal_ip(host)
        if literal is not None:
            if not is_public(str(literal)):
                raise FetchRefused("not an allowed host (a private or reserved address)")
            if "*" in self.patterns and port in PUBLIC_PORTS:
                return
            raise FetchRefused("not an allowed host")
        if port not in PUBLIC_PORTS:
            raise FetchRefused("not an allowed port")
        if not any(_matches(host, pattern) for pattern in self.patterns):
            raise FetchRefused("not an allowed host (see image_hosts)")

    def resolver(self) -> PublicResolver:
        return PublicResolver(self.named)


def _matches(host: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):  # *.cdninstagram.com: any subdomain, and the domain itself
        return host == pattern[2:] or host.endswith(pattern[1:])
    return fnmatch.fnmatchcase(host, pattern)


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, less every address that is not public, for every host and port the operator did not name.

    By host and port: naming ``http://localhost:8700`` as the source lets the scraper reach that one port of
    loopback, not ``localhost:80`` too (aiohttp passes the port it will connect to).
    """

    def __init__(self, named: Iterable[tuple[str, int]] = ()) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._named = frozenset(named)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if (host.rstrip(".").lower(), port) in self._named:
            return found
        public = [entry for entry in found if is_public(entry["host"])]
        if not public:
            raise NotPublicAddress(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()
