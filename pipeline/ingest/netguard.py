"""The private-address guard for URLs that come from posts (images, links).

A post can name any URL, so fetching it blindly would let anyone make the pipeline read
internal services or cloud metadata (SSRF). Two checks, both needed:
- `check_url` before every request and every redirect hop: http(s) only, and the host must
  resolve to public addresses only, unless it is listed in `network.allowed_private_hosts`;
- `GuardedAdapter` re-checks the address the socket actually connected to, so a DNS answer
  that changes between the check and the connect (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter

from pipeline.ingest.bounded import pool_classes

# Cloud metadata endpoints, refused even if some resolver maps them oddly.
METADATA_ADDRESSES = frozenset(
    {"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254", "192.0.0.192"}
)


class Refused(Exception):
    """A URL the guard will not fetch; the message says why (no secrets in it)."""


def _normalise_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def allowed_set(hosts: Iterable[str]) -> frozenset[str]:
    return frozenset(_normalise_host(h) for h in hosts)


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (not private, loopback, link-local, ...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA_ADDRESSES:
        return False
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    return sorted({info[4][0] for info in infos})


def check_url(url: str, allowed: frozenset[str]) -> None:
    """Raise `Refused` unless `url` is http(s) and its host is public or explicitly allowed.

    A host that cannot be resolved raises OSError (a transient failure, not a refusal).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise Refused(f"scheme {parts.scheme or '(none)'!r} is not allowed (http and https only)")
    host = parts.hostname
    if not host:
        raise Refused("URL has no host")
    if parts.username or parts.password:
        raise Refused("URL carries credentials")
    host = _normalise_host(host)
    if host in allowed:
        return
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    bad = [a for a in addresses if not is_public_address(a)]
    if bad or not addresses:
        raise Refused(f"host {host!r} resolves to a non-public address ({', '.join(bad) or 'none'})")


class _PeerCheck:
    """Mixin for urllib3 connections: refuse a socket connected to a non-public peer."""

    allowed: frozenset[str] = frozenset()

    def _new_conn(self):  # type: ignore[no-untyped-def]
        sock = super()._new_conn()  # type: ignore[misc]
        host = _normalise_host(self.host)  # type: ignore[attr-defined]
        if host in self.allowed:
            return sock
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = ""
        if not is_public_address(peer):
            sock.close()
            raise Refused(f"host {host!r} connected to a non-public address ({peer or 'unknown'})")
        return sock


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections refuse non-public peers (see module doc) and obey
    the running request's total deadline (`bounded.watchdog`)."""

    def __init__(self, allowed: frozenset[str], **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._allowed = allowed
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = pool_classes(_PeerCheck, allowed=self._allowed)
