"""A total deadline and a cap on decoded bytes for every HTTP response the pipeline reads.

Why: per-read socket timeouts do not bound a request. A server that drips its headers or its
body one byte a second never trips a 20 s read timeout, and a 1 MB gzip body can expand to
gigabytes in memory. So every request runs under a `Watchdog`: a timer that, at the request's
total deadline (connect + headers + body), shuts down every socket the request used, which
wakes the blocked read at once; the reader then reports "deadline exceeded" rather than
whatever the torn connection looked like. Bodies are read raw (`decode_content=False`) in
small chunks and decompressed here with `zlib` under `max_length`, so no step can produce
more than the cap (plus one chunk) however compressed the input.

The socket hook is `DeadlineMixin` on urllib3 connections, mounted by `BoundedAdapter` (feeds)
and `netguard.GuardedAdapter` (images): a new socket and a reused pooled one are both
registered with the watchdog of the request running in this thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

CHUNK = 16 * 1024
ACCEPT_ENCODING = "gzip, deflate"  # what we can decode under a cap; never br/zstd
_local = threading.local()


class LimitExceeded(Exception):
    """A response broke a limit. `kind`: deadline | too_large | encoding; str() is the reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class CorruptBody(Exception):
    """A compressed body that does not decode or ends early (like a truncated body: retryable)."""


class Watchdog:
    """Shuts down the sockets of one request when its total deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.001, float(seconds))
        self.deadline = time.monotonic() + self.seconds
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeouts(self, read_s: float, connect_s: float = 10.0) -> tuple[float, float]:
        """requests' (connect, read) timeouts, never longer than what is left of the deadline."""
        left = max(0.05, self.remaining())
        return (min(connect_s, read_s, left), min(read_s, left))

    @property
    def expired(self) -> bool:
        """Fired, or so close that a socket timeout just now was really the deadline."""
        return self.fired or self.remaining() <= 0.1

    def add(self, sock: Any) -> None:
        if sock is None:
            return
        with self._lock:
            if self.fired:
                _shutdown(sock)
            elif not self._closed:
                self._socks.append(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._socks.clear()
        self._timer.cancel()

    def check(self) -> None:
        if self.fired or self.remaining() <= 0:
            raise LimitExceeded("deadline", f"exceeded the {self.seconds:g} s deadline for the whole request")


def _shutdown(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[Watchdog]:
    """Run a request under a total deadline (see the module doc); nests per thread."""
    wd = Watchdog(seconds)
    previous = getattr(_local, "current", None)
    _local.current = wd
    try:
        yield wd
    finally:
        _local.current = previous
        wd.close()


def _register(sock: Any) -> None:
    wd = getattr(_local, "current", None)
    if wd is not None:
        wd.add(sock)


class DeadlineMixin:
    """For urllib3 connections: hand each socket to the running request's watchdog."""

    def _new_conn(self):  # type: ignore[no-untyped-def]
        sock = super()._new_conn()  # type: ignore[misc]
        _register(sock)  # before TLS: a handshake dripped byte by byte is cut too
        return sock

    def getresponse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _register(getattr(self, "sock", None))  # a pooled connection reused by this request
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


def pool_classes(*mixins: type, **attrs: Any) -> dict[str, type]:
    """urllib3 pool classes whose connections carry `mixins` (and DeadlineMixin)."""
    http_conn = type("BoundedHTTPConnection", (*mixins, DeadlineMixin, HTTPConnection), dict(attrs))
    https_conn = type("BoundedHTTPSConnection", (*mixins, DeadlineMixin, HTTPSConnection), dict(attrs))
    return {
        "http": type("BoundedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("BoundedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


class BoundedAdapter(HTTPAdapter):
    """A requests adapter whose connections obey the running request's `watchdog`."""

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = pool_classes()


def mount(session: requests.Session, adapter: HTTPAdapter) -> requests.Session:
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["Accept-Encoding"] = ACCEPT_ENCODING
    return session


TRANSIENT = (requests.RequestException, urllib3.exceptions.HTTPError, OSError, CorruptBody)


class _Inflater:
    """Content-Encoding gzip/deflate decoding with every output bounded by `room`."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._obj: Any = None

    def _new(self, first: bytes) -> Any:
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # `deflate` is zlib-wrapped per the RFC, but some servers send raw deflate
        wrapped = len(first) >= 2 and (first[0] & 0x0F) == 8 and ((first[0] << 8) | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes, out: bytearray, cap: int) -> None:
        while data:
            if self._obj is None:
                self._obj = self._new(data)
            try:
                piece = self._obj.decompress(data, cap - len(out) + 1)
            except zlib.error as exc:
                raise CorruptBody(f"corrupt {self.encoding} body: {exc}") from None
            out += piece
            if len(out) > cap:
                raise LimitExceeded("too_large", f"more than {cap} bytes once decoded ({self.encoding})")
            data = self._obj.unconsumed_tail
            if not data and self._obj.eof:
                data = self._obj.unused_data  # a second gzip member follows
                if data.strip(b"\x00"):
                    self._obj = None
                else:
                    data = b""

    def finish(self) -> None:
        if self._obj is not None and not self._obj.eof:
            raise CorruptBody(f"truncated {self.encoding} body")


def _inflater(resp: requests.Response) -> _Inflater | None:
    raw = resp.headers.get("Content-Encoding", "")
    codings = [c.strip().lower() for c in raw.split(",") if c.strip() and c.strip().lower() != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise LimitExceeded("encoding", f"unsupported Content-Encoding {raw[:40]!r} (gzip or deflate only)")
    return _Inflater(codings[0])


def read_body(resp: requests.Response, cap: int, wd: Watchdog) -> bytes:
    """The decoded body of a `stream=True` response, at most `cap` bytes, before `wd` fires.

    Raises LimitExceeded (deadline, too_large, encoding), CorruptBody for a corrupt or truncated
    compressed body, and urllib3/OS errors for a broken connection (see `is_transient`). On success the body is
    also set as `resp.content` (so `.json()`/`.text` work) and the connection goes back to the pool.
    """
    length = resp.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > cap:
        raise LimitExceeded("too_large", f"Content-Length {int(length)} is over the cap of {cap} bytes")
    inflater = _inflater(resp)
    out = bytearray()
    raw = resp.raw
    try:
        while True:
            wd.check()
            data = raw.read(CHUNK, decode_content=False)
            if not data:
                break
            if inflater is None:
                out += data
                if len(out) > cap:
                    raise LimitExceeded("too_large", f"more than {cap} bytes")
            else:
                inflater.feed(data, out, cap)
        wd.check()  # a socket shut by the watchdog can look like a clean end of the body
        if inflater is not None:
            inflater.finish()
    except LimitExceeded:
        raise
    except Exception:
        wd.check()
        raise
    body = bytes(out)
    resp._content = body  # type: ignore[attr-defined]
    resp._content_consumed = True  # type: ignore[attr-defined]
    return body
