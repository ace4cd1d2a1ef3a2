"""Safe, concurrent image download into content-addressed storage.

Each pending `post_images` row is fetched at most once per URL per run by a bounded thread
pool with a per-host connection limit, through the private-address guard (`netguard`,
re-checked on every redirect hop and on the connected socket), under a total deadline for all
hops and a cap on decoded bytes (`bounded`: a server dripping headers or body cannot hold a
worker past `network.deadline_s`, a gzip-encoded bomb stops at `network.max_image_bytes`).
The bytes must sniff as JPEG, PNG, WebP or GIF and decode with Pillow (first frame; its
decompression-bomb guard plus our own pixel cap) before they are stored once, at
`images/sha256/ab/cd/<sha256>`, so a reposted image is one object and one `images` row.

Outcomes per row: `stored` (with sha256), `failed` (could not get it: network, timeout,
HTTP error; retried by later runs) or `quarantined` (got or refused something unacceptable:
not an image, too big, corrupt, private address, bad scheme), always with a reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image
from sqlalchemy import Connection, Engine, bindparam, select, update

from pipeline.database import chunks, upsert
from pipeline.dirty import mark_days_of_stored
from pipeline.ingest import bounded, netguard
from pipeline.objectstore import ObjectStore
from pipeline.progress import Progress, of
from pipeline.schema import images, post_images, posts, utcnow
from pipeline.settings import NetworkConfig

if TYPE_CHECKING:
    from pipeline.context import Context

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_PIXELS = 64_000_000
WRITE_BATCH = 200
MIME_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF"}

warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce our own, lower cap


class ImageProblem(Exception):
    """`status` is failed (may work later) or quarantined (will not); str() is the reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def storage_key(sha: str) -> str:
    return f"images/sha256/{sha[:2]}/{sha[2:4]}/{sha}"


def sniff(data: bytes) -> str | None:
    """The MIME type from magic bytes, for the four formats we accept; None otherwise."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _describe(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if not data:
        return "empty body"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML, not an image"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "SVG/XML, not a raster image"
    return "not a JPEG, PNG, WebP or GIF image"


@dataclass(frozen=True)
class Inspected:
    sha256: str
    mime: str
    width: int
    height: int
    size: int


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Inspected:
    """Check that `data` is a sane image; raise ImageProblem('quarantined', why) if not."""
    mime = sniff(data)
    if mime is None:
        raise ImageProblem("quarantined", _describe(data))
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageProblem("quarantined", "image has no pixels")
            if width * height > max_pixels:
                raise ImageProblem("quarantined", f"image too large: {width}x{height} pixels (cap {max_pixels})")
            if MIME_FORMATS[mime] != im.format:
                raise ImageProblem("quarantined", f"content sniffed as {mime} but decodes as {im.format}")
            if im.format == "JPEG":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # decode small: still catches truncation
            im.seek(0)
            im.load()
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageProblem("quarantined", f"decompression bomb: {exc}"[:300]) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        raise ImageProblem("quarantined", f"corrupt {mime.split('/')[1].upper()}: {exc}"[:300]) from None
    return Inspected(hashlib.sha256(data).hexdigest(), mime, width, height, len(data))


class Downloader:
    """HTTP GET with the guard, manual redirects, a byte cap and per-host limits."""

    def __init__(self, network: NetworkConfig) -> None:
        self.network = network
        self.allowed = netguard.allowed_set(network.allowed_private_hosts)
        self.session = requests.Session()
        self.session.trust_env = False  # direct connections: the guard must see the real peer
        adapter = netguard.GuardedAdapter(self.allowed, pool_connections=32, pool_maxsize=max(4, network.image_workers * 2), max_retries=0)
        bounded.mount(self.session, adapter)
        self.session.headers["User-Agent"] = network.user_agent
        self.session.headers["Accept"] = "image/webp,image/png,image/jpeg,image/gif;q=0.9,*/*;q=0.1"
        self._host_locks: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            sem = self._host_locks.get(host)
            if sem is None:
                sem = self._host_locks[host] = threading.BoundedSemaphore(max(1, self.network.per_host_connections))
            return sem

    def get(self, url: str) -> bytes:
        """The image's bytes, following redirects; every hop guarded and all of them together
        bounded by `network.deadline_s` of network time (waiting for a host slot not counted)
        and `network.max_image_bytes` decoded bytes."""
        cap = int(self.network.max_image_bytes)
        timeout = float(self.network.timeout_s)
        budget = float(self.network.deadline_s)
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                netguard.check_url(url, self.allowed)
            except netguard.Refused as exc:
                raise ImageProblem("quarantined", f"refused: {exc}") from None
            except OSError as exc:
                raise ImageProblem("failed", str(exc)[:200]) from None
            if budget <= 0:
                raise ImageProblem("failed", f"download exceeded the {self.network.deadline_s:g} s deadline (redirects included)")
            with self._host_slot(url):
                began = time.monotonic()
                try:
                    location = self._hop(url, cap, timeout, budget)
                finally:
                    budget -= time.monotonic() - began
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
        raise ImageProblem("quarantined", f"more than {MAX_REDIRECTS} redirects")

    def _hop(self, url: str, cap: int, timeout: float, budget: float) -> bytes | str:
        """One request: the body (bytes) or a redirect's Location (str)."""
        total = float(self.network.deadline_s)
        with bounded.watchdog(budget) as wd:
            try:
                resp = self.session.get(url, stream=True, timeout=wd.timeouts(timeout), allow_redirects=False)
            except netguard.Refused as exc:
                raise ImageProblem("quarantined", f"refused: {exc}") from None
            except requests.RequestException as exc:
                if wd.expired:
                    raise ImageProblem("failed", f"download exceeded the {total:g} s deadline") from None
                if isinstance(exc, requests.Timeout):
                    raise ImageProblem("failed", "timed out") from None
                if isinstance(exc.__context__, netguard.Refused) or "non-public address" in str(exc):
                    raise ImageProblem("quarantined", "refused: connected to a non-public address") from None
                raise ImageProblem("failed", f"connection failed: {type(exc).__name__}") from None
            try:
                if resp.is_redirect:
                    location = resp.headers.get("Location", "")
                    if not location:
                        raise ImageProblem("failed", f"HTTP {resp.status_code} redirect without Location")
                    return location
                if resp.status_code != 200:
                    raise ImageProblem("failed", f"HTTP {resp.status_code}")
                try:
                    return bounded.read_body(resp, cap, wd)
                except bounded.LimitExceeded as exc:
                    if exc.kind == "deadline":
                        raise ImageProblem("failed", f"download exceeded the {total:g} s deadline") from None
                    if exc.kind == "too_large":
                        raise ImageProblem("quarantined", f"too large: {exc}") from None
                    raise ImageProblem("quarantined", str(exc)) from None
                except bounded.TRANSIENT as exc:
                    if wd.expired:
                        raise ImageProblem("failed", f"download exceeded the {total:g} s deadline") from None
                    if isinstance(exc, bounded.CorruptBody):
                        raise ImageProblem("failed", str(exc)[:200]) from None
                    raise ImageProblem("failed", f"download interrupted: {type(exc).__name__}") from None
            finally:
                resp.close()

    def close(self) -> None:
        self.session.close()


@dataclass
class Outcome:
    url: str
    status: str  # stored | failed | quarantined
    reason: str | None = None
    info: Inspected | None = None


ByteSource = Callable[[str], bytes | None]


def fetch_one(url: str, downloader: Downloader, store: ObjectStore, own_bytes: ByteSource | None, stored_shas: set[str], lock: threading.Lock) -> Outcome:
    """Fetch, check and store one URL; never raises for a bad image."""
    try:
        data = None
        if own_bytes is not None:
            try:
                data = own_bytes(url)
            except Exception as exc:  # a source's own image lookup failed: treat like a fetch error
                raise ImageProblem("failed", f"source could not provide the image: {type(exc).__name__}") from None
        if data is None:
            data = downloader.get(url)
        if len(data) > downloader.network.max_image_bytes:
            raise ImageProblem("quarantined", f"too large: {len(data)} bytes (cap {downloader.network.max_image_bytes})")
        info = inspect_image(data)
        with lock:
            known = info.sha256 in stored_shas
        if not known:
            store.put(storage_key(info.sha256), data, content_type=info.mime)
            with lock:
                stored_shas.add(info.sha256)
        return Outcome(url, "stored", None, info)
    except ImageProblem as exc:
        return Outcome(url, exc.status, str(exc)[:500])
    except Exception as exc:  # a storage error: the image stays retryable
        log.warning("storing image failed: %s", type(exc).__name__)
        return Outcome(url, "failed", f"storage error: {type(exc).__name__}: {str(exc)[:200]}")


def pending_rows(conn: Connection, *, sources_in: Iterable[str] | None = None, post_ids: Iterable[int] | None = None,
                 window: tuple[dt.datetime, dt.datetime] | None = None, statuses: tuple[str, ...] = ("pending", "failed")) -> list[dict[str, Any]]:
    q = (
        select(post_images.c.id, post_images.c.post_id, post_images.c.url, post_images.c.attempts, posts.c.source)
        .join(posts, posts.c.id == post_images.c.post_id)
        .where(post_images.c.status.in_(statuses))
        .order_by(post_images.c.id)
    )
    if sources_in is not None:
        q = q.where(posts.c.source.in_(list(sources_in)))
    if window is not None:
        q = q.where(posts.c.posted_at >= window[0], posts.c.posted_at < window[1])
    if post_ids is not None:
        ids = list(post_ids)
        rows: list[dict[str, Any]] = []
        for batch in chunks(ids, 500):
            rows += [dict(r) for r in conn.execute(q.where(post_images.c.post_id.in_(batch))).mappings()]
        return sorted(rows, key=lambda r: r["id"])
    return [dict(r) for r in conn.execute(q).mappings()]


def process(
    ctx: Context,
    rows: list[dict[str, Any]],
    byte_sources: dict[str, ByteSource] | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Fetch the images of `rows` (from `pending_rows`) and record every outcome."""
    counts = {"images_stored": 0, "images_failed": 0, "images_quarantined": 0}
    if not rows:
        return counts
    byte_sources = byte_sources or {}
    engine, store, network = ctx.engine, ctx.store, ctx.settings.network
    by_url: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_url.setdefault((row["source"], row["url"]), []).append(row)

    # An URL already stored for another post (a repost) needs no new download.
    known: dict[str, Inspected] = {}
    urls = sorted({u for _, u in by_url})
    with engine.connect() as conn:
        for batch in chunks(urls, 200):
            q = (
                select(post_images.c.url, images.c.sha256, images.c.mime, images.c.width, images.c.height, images.c.size_bytes)
                .join(images, images.c.sha256 == post_images.c.sha256)
                .where(post_images.c.url.in_(batch), post_images.c.status == "stored")
            )
            for url, sha, mime, w, h, size in conn.execute(q):
                known[url] = Inspected(sha, mime, w or 0, h or 0, size)

    downloader = Downloader(network)
    stored_shas: set[str] = {i.sha256 for i in known.values()}
    lock = threading.Lock()
    pending: list[tuple[Outcome, list[dict[str, Any]]]] = []
    bar = of(progress)(len(by_url), "images", "img")
    try:
        with ThreadPoolExecutor(max_workers=max(1, network.image_workers), thread_name_prefix="img") as pool:
            futures = {}
            for (source, url), group in by_url.items():
                if url in known:
                    pending.append((Outcome(url, "stored", None, known[url]), group))
                    continue
                futures[pool.submit(fetch_one, url, downloader, store, byte_sources.get(source), stored_shas, lock)] = group
            for fut in as_completed(futures):
                pending.append((fut.result(), futures[fut]))
                bar.update(1)
                if len(pending) >= WRITE_BATCH:
                    _record(engine, pending, counts)
                    pending = []
            _record(engine, pending, counts)
    finally:
        bar.close()
        downloader.close()
    return counts


def _record(engine: Engine, outcomes: list[tuple[Outcome, list[dict[str, Any]]]], counts: dict[str, int]) -> None:
    if not outcomes:
        return
    now = utcnow()
    image_rows = {}
    updates = []
    stored: list[tuple[int, str]] = []
    for outcome, group in outcomes:
        if outcome.info is not None:
            i = outcome.info
            image_rows[i.sha256] = {
                "sha256": i.sha256, "storage_key": storage_key(i.sha256), "mime": i.mime,
                "width": i.width, "height": i.height, "size_bytes": i.size, "created_at": now,
            }
        for row in group:
            counts[f"images_{outcome.status}"] += 1
            if outcome.status == "stored" and outcome.info is not None:
                stored.append((row["post_id"], outcome.info.sha256))
            updates.append({
                "b_id": row["id"], "b_status": outcome.status, "b_reason": outcome.reason,
                "b_sha": outcome.info.sha256 if outcome.info else None,
                "b_attempts": int(row["attempts"] or 0) + 1, "b_now": now,
            })
    with engine.begin() as conn:
        if image_rows:
            upsert(conn, images, sorted(image_rows.values(), key=lambda r: r["sha256"]), keys=["sha256"], update=())
        conn.execute(
            update(post_images)
            .where(post_images.c.id == bindparam("b_id"))
            .values(status=bindparam("b_status"), reason=bindparam("b_reason"), sha256=bindparam("b_sha"),
                    attempts=bindparam("b_attempts"), updated_at=bindparam("b_now")),
            updates,
        )
        # In the same transaction: a crash leaves neither the image nor the mark.
        mark_days_of_stored(conn, stored)
