"""A polite, stubborn HTTP client for feed APIs (a `requests.Session` wrapper).

Polite: a descriptive User-Agent, and it waits when the API says so (`Retry-After` on 429/503,
`X-RateLimit-Remaining: 0` until `X-RateLimit-Reset`; Bluesky's unprefixed `RateLimit-*` too). Stubborn: 5xx answers, timeouts,
dropped connections and truncated JSON bodies are retried with exponential backoff and
jitter, up to `network.max_retries` times. Bounded: each attempt runs under a total deadline
(`network.deadline_s`: connect + headers + body, even when the server drips bytes) and its body
is read with a cap on DECODED bytes (`network.max_response_bytes`), see `bounded`. A deadline is
retried like a timeout; a body over the cap, an unsupported Content-Encoding or JSON nested too
deeply is not (it would be the same next time) and fails the window at once with the reason.
Errors name the method, the URL without its query values and the status, never a token: every
registered secret is scrubbed from messages.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from pipeline.errors import BrandmonError
from pipeline.ingest import bounded
from pipeline.settings import NetworkConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({500, 502, 503, 504, 520, 521, 522, 523, 524})
MAX_BACKOFF_S = 60.0


class FeedError(BrandmonError):
    """A feed API kept failing or answered something unusable; the window's run fails."""


def safe_url(url: str) -> str:
    """The URL without query values or userinfo: enough to locate a failure, nothing secret."""
    from pipeline.redact import redact_url

    try:
        parts = urlsplit(redact_url(url))
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{kv.split('=', 1)[0]}=…" for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scrub(message: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            message = message.replace(secret, "***")
    return message


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def parse_rate_reset(value: str | None, now: float | None = None) -> float | None:
    """Seconds until an `X-RateLimit-Reset`: Mastodon sends an ISO time, Reddit seconds, others epoch."""
    if not value:
        return None
    now = time.time() if now is None else now
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return max(0.0, when.timestamp() - now)
    if number > 1e9:  # an epoch timestamp
        return max(0.0, number - now)
    return max(0.0, number)


@dataclass
class HttpStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    waited_s: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


class HttpClient:
    """GET/POST JSON with retries, backoff and rate-limit waits; see the module doc."""

    def __init__(
        self,
        network: NetworkConfig,
        *,
        secrets: Iterable[str] = (),
        backoff_s: float = 1.0,
        max_wait_s: float = 900.0,
        timeout_s: float | None = None,
        user_agent: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        session: requests.Session | None = None,
    ) -> None:
        self.network = network
        self.secrets: list[str] = [s for s in secrets if s]
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s or network.timeout_s
        self.max_retries = max(0, int(network.max_retries))
        self.sleep = sleep
        self.jitter = jitter
        self.session = session or bounded.mount(requests.Session(), bounded.BoundedAdapter(max_retries=0))
        self.session.headers["User-Agent"] = user_agent or network.user_agent
        self.session.headers.setdefault("Accept", "application/json")
        self.stats = HttpStats()
        self._not_before = 0.0  # monotonic time before which the rate limit says wait

    def add_secret(self, secret: str | None) -> None:
        if secret:
            self.secrets.append(secret)

    def close(self) -> None:
        self.session.close()

    # --- waiting ---------------------------------------------------------------------------

    def _wait(self, seconds: float, why: str) -> None:
        seconds = min(max(0.0, seconds), self.max_wait_s)
        if seconds <= 0:
            return
        log.info("waiting %.1fs: %s", seconds, why)
        self.stats.waited_s += seconds
        self.sleep(seconds)

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * (2**attempt)) * (0.5 + self.jitter())

    def _note_rate_limit(self, resp: requests.Response) -> None:
        remaining = _header(resp, "RateLimit-Remaining")
        if remaining is None:
            return
        try:
            left = float(remaining)
        except ValueError:
            return
        if left < 1:
            reset = parse_rate_reset(_header(resp, "RateLimit-Reset"))
            if reset is not None:
                self._not_before = time.monotonic() + min(reset, self.max_wait_s)

    # --- requests --------------------------------------------------------------------------

    def _fail(self, method: str, url: str, detail: str) -> FeedError:
        return FeedError(scrub(f"{method} {safe_url(url)} failed: {detail}", self.secrets))

    def request_json(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        auth: Any = None,
        ok_statuses: Iterable[int] = (200,),
    ) -> tuple[Any, requests.Response]:
        """One JSON request, retried as the module doc says; returns (parsed body, response).

        A status outside `ok_statuses` that is not retryable raises `FeedError` at once;
        the response is attached as `.response` so callers can react (e.g. expired tokens).
        """
        ok = set(ok_statuses)
        attempts = self.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            wait = self._not_before - time.monotonic()
            if wait > 0:
                self.stats.throttled += 1
                self._wait(wait, f"rate limit of {safe_url(url)}")
            if attempt:
                self.stats.retries += 1
            self.stats.requests += 1
            try:
                resp, content = self._send(method, url, params=params, headers=headers, json=json_body, data=data, auth=auth)
            except _Retry as exc:
                last = str(exc)
                if attempt + 1 < attempts:
                    self._wait(self._backoff(attempt), f"{last} on {safe_url(url)}")
                continue
            self.stats.statuses[resp.status_code] = self.stats.statuses.get(resp.status_code, 0) + 1
            self._note_rate_limit(resp)
            if resp.status_code == 429 or resp.status_code in RETRY_STATUSES:
                last = f"HTTP {resp.status_code}"
                if attempt + 1 >= attempts:
                    break
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if resp.status_code == 429:
                    self.stats.throttled += 1
                    if retry_after is None:
                        reset = parse_rate_reset(_header(resp, "RateLimit-Reset"))
                        retry_after = reset if reset is not None else self._backoff(attempt)
                    self._wait(retry_after, f"HTTP 429 from {safe_url(url)}")
                else:
                    self._wait(retry_after if retry_after is not None else self._backoff(attempt), f"{last} from {safe_url(url)}")
                continue
            if resp.status_code not in ok:
                err = self._fail(method, url, f"HTTP {resp.status_code}{_api_error(resp)}")
                err.response = resp  # type: ignore[attr-defined]
                raise err
            try:
                return json.loads(content), resp
            except RecursionError:
                raise self._fail(method, url, "response refused: JSON nested too deeply to parse") from None
            except (ValueError, UnicodeDecodeError):
                last = "the response is not valid JSON (truncated?)"
                if attempt + 1 < attempts:
                    self._wait(self._backoff(attempt), f"{last} from {safe_url(url)}")
                continue
        raise self._fail(method, url, f"{last} after {attempts} attempts")

    def _send(self, method: str, url: str, **kwargs: Any) -> tuple[requests.Response, bytes]:
        """One attempt under the total deadline and the decoded-size cap (see `bounded`).

        Raises `_Retry(why)` for what may pass (deadline, timeout, dropped connection, a corrupt
        compressed body) and `FeedError` for what will not (too large, unknown encoding, bad URL).
        """
        with bounded.watchdog(self.network.deadline_s) as wd:
            try:
                resp = self.session.request(method, url, timeout=wd.timeouts(self.timeout_s), allow_redirects=False,
                                            stream=True, **kwargs)
                try:
                    return resp, bounded.read_body(resp, int(self.network.max_response_bytes), wd)
                finally:
                    resp.close()
            except bounded.LimitExceeded as exc:
                if exc.kind == "deadline":
                    raise _Retry(str(exc)) from None
                raise self._fail(method, url, f"response refused: {exc}") from None
            except (requests.Timeout, requests.ConnectionError) as exc:
                raise _Retry(_deadline(wd) if wd.expired else "timed out" if isinstance(exc, requests.Timeout)
                             else "connection failed") from None
            except requests.RequestException as exc:  # an invalid URL or header: not transient
                raise self._fail(method, url, type(exc).__name__) from None
            except (urllib3.exceptions.HTTPError, OSError, bounded.CorruptBody) as exc:
                if wd.expired:
                    raise _Retry(_deadline(wd)) from None
                if isinstance(exc, bounded.CorruptBody):
                    raise _Retry(str(exc)[:120]) from None
                raise _Retry("timed out" if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)
                             else "connection failed while reading the body") from None

    def get_json(self, url: str, **kwargs: Any) -> tuple[Any, requests.Response]:
        return self.request_json("GET", url, **kwargs)


class _Retry(Exception):
    """An attempt failed in a way the next attempt may not; str() says how."""


def _deadline(wd: bounded.Watchdog) -> str:
    return f"exceeded the {wd.seconds:g} s deadline for the whole request"


def _header(resp: requests.Response, name: str) -> str | None:
    """`X-<name>` (Mastodon, Reddit) or `<name>` (Bluesky, the IETF draft); case-insensitive."""
    value = resp.headers.get("X-" + name)
    return value if value is not None else resp.headers.get(name)


def _api_error(resp: requests.Response) -> str:
    """A short, secret-free hint from an API error body (`error`/`message` fields only)."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    parts = [str(body[k])[:120] for k in ("error", "message") if isinstance(body.get(k), str | int)]
    return f" ({'; '.join(parts)})" if parts else ""
