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
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not is_public_address(str(embedded)):
            return False  # e.g. ::ffff:10.0.0.1, NAT64 64:ff9b::a00:1 or 6to4 2002:a00:1::: a private target
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if str(ip) in METADATA_ADDRESSES:
        return False
    return ip.is_global and not ip.is_multicast


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one forwards to: IPv4-mapped, IPv4-compatible (::a.b.c.d),
    NAT64 (RFC 6052/8215), 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 or any(ip in net for net in NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: e.g. a NUL in the name
        raise OSError(f"cannot resolve host {host[:80]!r}: {str(exc)[:80]}") from None
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
    if "%" in host:  # an IPv6 zone id (fe80::1%eth0) names a local interface
        raise Refused(f"host {host[:80]!r} carries an IPv6 zone id (link-local)")
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
