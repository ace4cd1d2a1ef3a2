"""What every connector provides, and the pagination loop they share.

A connector (each platform's `pipeline.sources.<platform>.connector`) turns a half-open window [start, end) into raw pages (`Page`: what was asked,
what came back) and knows how to read records out of a page body and normalise one record.
Everything else (lake, loader, images, run log) is the job's business, so a connector stays a
thin, testable adapter over one API.

Pagination strategies differ only in how the next request is derived: `max_id` from a
`Link` header (Mastodon), an opaque `cursor` (Bluesky), an `after` token (Reddit). The shared
`walk` loop adds what all of them need: a stop condition, a page cap, and loop detection (a
cursor seen twice or one that goes backwards fails the window cleanly instead of spinning).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import ConfigError
from pipeline.ingest.http import FeedError, HttpClient
from pipeline.objectstore import ObjectStore
from pipeline.progress import Progress
from pipeline.records import Post
from pipeline.settings import NetworkConfig, Settings, SourceConfig, environ
from pipeline.sources.options import SourceOptions
from pipeline.sources.parsing import Normalizer
from pipeline.sources.registry import options_of

if TYPE_CHECKING:
    from typing import Self


@dataclass
class Page:
    """One raw response. `state` resumes the walk right after this page (None: not resumable)."""

    request: dict[str, Any]
    body: Any
    state: dict[str, Any] | None = None
    raw_key: str | None = None  # set when the page already lives in the lake (archive)
    records: list[Any] | None = None  # pre-extracted records (archive); else records_of(body)


@dataclass
class Step:
    """What a strategy returns for one fetched page."""

    request: dict[str, Any]
    body: Any
    records: list[Any]
    next_cursor: Any = None  # None = the stream is exhausted
    stop: bool = False  # the page reached the window start: no need to go further


@dataclass
class Stream:
    """One paginated listing (a hashtag timeline, a search query, a subreddit)."""

    name: str
    fetch: Callable[[Any], Step]  # cursor -> Step
    first_cursor: Any = None
    is_backwards: Callable[[Any, Any], bool] = field(default=lambda _prev, _next: False)


def env_secret(source: SourceConfig, option: str, required: bool = False) -> str | None:
    """Read a secret from the environment variable NAMED by option `option` (never the value)."""
    var = source.get(option)
    if not var:
        if required:
            raise ConfigError(f"source {source.name!r}: set `{option}` to the NAME of the environment variable holding it")
        return None
    if not isinstance(var, str):
        raise ConfigError(f"source {source.name!r}: `{option}` must be an environment variable name")
    value = environ().get(var)
    if not value:
        raise ConfigError(f"source {source.name!r}: environment variable {var} (from `{option}`) is not set")
    return value


def iso_z(when: dt.datetime) -> str:
    """`when` as the API's UTC ISO text (`2026-10-01T06:00:00Z`)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DayIndex(Protocol):
    """Derived state a source needs before its windows (the archive's day index), brought up
    to date by the ingest job's index step (`pipeline.ingest.jobs.index_step`)."""

    def fingerprint(self, listing: list[tuple[str, str]]) -> str: ...

    def read_manifest(self, store: ObjectStore) -> dict[str, Any] | None: ...

    def build(self, store: ObjectStore, fp: str, listing: list[tuple[str, str]], previous: dict[str, Any] | None,
              progress: Progress | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]: ...

    def listing(self) -> list[tuple[str, str]]: ...


class Connector:
    """Base class; subclasses set `kind`/`platform` and implement `streams` or `pages`."""

    kind = "base"
    platform = "base"
    writes_raw = True  # pages go to the lake (the archive connector reads the lake instead)
    index: DayIndex | None = None  # built by the job's index step before the windows
    options: SourceOptions
    ties = "incoming"  # two copies with one posted time: the one loaded last wins (`loader` module doc)

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, sleep: Callable[[float], None] | None = None) -> None:
        self.source = source
        self.network = network
        self.options = options_of(source)
        self.max_pages = self.options.max_pages
        self._sleep = sleep
        self._client: HttpClient | None = None
        # True once `prepare(force=True)` (or a first build) refreshed derived state in this
        # run: later forced windows served by this connector reuse it instead of redoing it.
        self.refreshed = False

    @classmethod
    def from_settings(cls, settings: Settings, source: SourceConfig, *, sleep: Callable[[float], None] | None = None) -> Self:
        """The connector of `source` as the settings configure it (the registry's factory calls this)."""
        return cls(source, settings.network, sleep=sleep)

    def use_index(self, store: ObjectStore, manifest: dict[str, Any]) -> None:
        """The index the windows read, from the job's index step (only sources with an `index`)."""
        raise NotImplementedError

    # --- HTTP ----------------------------------------------------------------------------------

    @property
    def client(self) -> HttpClient:
        if self._client is None:
            kwargs: dict[str, Any] = {}
            if self._sleep is not None:
                kwargs["sleep"] = self._sleep
            self._client = HttpClient(
                self.network,
                backoff_s=float(self.options.backoff_s),
                max_wait_s=float(self.options.max_wait_s),
                timeout_s=self.options.timeout_s,
                user_agent=self.options.user_agent,
                **kwargs,
            )
        return self._client

    @property
    def secrets(self) -> list[str]:
        return list(self._client.secrets) if self._client else []

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # --- the contract --------------------------------------------------------------------------

    def streams(self, start: dt.datetime, end: dt.datetime) -> list[Stream]:
        raise NotImplementedError

    def pages(self, start: dt.datetime, end: dt.datetime, resume: dict[str, Any] | None = None) -> Iterator[Page]:
        """Raw pages of the window, resuming after the page whose `state` is `resume`."""
        streams = self.streams(start, end)
        first_stream = int(resume.get("stream", 0)) if resume else 0
        for index, stream in enumerate(streams):
            if index < first_stream:
                continue
            cursor = resume.get("cursor") if resume and index == first_stream else None
            if resume and index == first_stream and resume.get("stream_done"):
                continue
            yield from self.walk(index, stream, cursor if cursor is not None else stream.first_cursor)

    def walk(self, index: int, stream: Stream, cursor: Any) -> Iterator[Page]:
        seen: set[str] = set()
        pages = 0
        while True:
            key = json.dumps(cursor, sort_keys=True, default=str)
            if key in seen:
                raise FeedError(f"{self.source.name}: {stream.name}: the API returned cursor {key[:80]} twice (a pagination loop); re-run the window")
            seen.add(key)
            pages += 1
            if pages > self.max_pages:
                raise FeedError(f"{self.source.name}: {stream.name}: more than {self.max_pages} pages in one window; raise `max_pages` or use smaller windows")
            step = stream.fetch(cursor)
            nxt = step.next_cursor
            done = step.stop or nxt is None or not step.records
            if not done and stream.is_backwards(cursor, nxt):
                raise FeedError(f"{self.source.name}: {stream.name}: the API's next cursor goes backwards ({str(nxt)[:40]}); re-run the window")
            state = {"stream": index, "stream_done": True} if done else {"stream": index, "cursor": nxt}
            yield Page(request=step.request, body=step.body, state=state, records=step.records)
            if done:
                return
            cursor = nxt

    def records_of(self, body: Any) -> list[Any]:
        """Records in a page body (used when re-reading pages from the lake on resume)."""
        raise NotImplementedError

    def make_normalizer(self, salt: str, now: dt.datetime | None = None) -> Normalizer:
        return Normalizer(salt, now=now, default_platform=self.platform)

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        raise NotImplementedError

    def record_ref(self, record: Any) -> str | None:
        """A stable id for quarantine rows, if the record has one."""
        if isinstance(record, dict):
            value = record.get("id") or record.get("uri")
            if isinstance(value, str | int) and not isinstance(value, bool):
                return str(value)[:200]
        return None

    def image_bytes(self, url: str) -> bytes | None:
        """Bytes of an image this source serves itself (synthetic); None = fetch over HTTP."""
        return None
