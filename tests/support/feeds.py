"""Local stand-ins for the feed APIs: an HTTP server on 127.0.0.1 that serves recorded or
generated pages in each API's documented shape, with injectable faults.

Used by the ingestion tests and the reliability suite (test code, not shipped; the demo's data
comes from `pipeline.synthetic`): the connectors talk to it over real HTTP exactly as they talk
to the real services (point `base_url` at `server.url` and list `127.0.0.1` in
`network.allowed_private_hosts` for its images).

- `FakeServer`: routes (`add_json`, `add_sequence` to replay recorded responses in order,
  `add_bytes`, `add_redirect`, `route`) and faults (`fault(...)`: an HTTP status with an
  optional Retry-After, a slow answer that trips client timeouts, a truncated body, a
  dropped connection, a repeated previous answer, a cursor sent backwards).
- `FakeMastodon`: tag timelines and account statuses with `max_id`/`min_id`/`since_id`
  paging and `Link` headers, `accounts/lookup`; ids of any server of the API (`status_id`:
  Mastodon snowflakes, pre-2.0 serial integers, GoToSocial ULIDs, Akkoma/Pleroma flake ids).
- `HostileServer`: byte-level misbehaviour (drip headers or body, Content-Length lies, endless
  chunks, slow or looping redirects) and `gzip_bomb` bodies, for the deadline and size caps.
- `FakeBluesky`: `com.atproto.server.createSession` (app password -> JWTs, expiry) and
  `app.bsky.feed.searchPosts` (`q`, `since`, `until`, `cursor`, bearer auth).
- `FakeReddit`: `/r/<sub>/new.json`, `/r/<sub>/search.json`, `/search.json` listings with
  `after`, and the client-credentials token endpoint (`expires_in`, tokens that expire).
Both take `overlap=N`: every page after the first starts with the last N items of the page
before, as a live listing does when new posts arrive between two requests (duplicates
across pages).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        self.headers.setdefault("Content-Type", "application/json")
        return json.dumps(self.body).encode()


@dataclass
class Fault:
    """An injected misbehaviour for requests whose path starts with `path`.

    kind: `status` (answer `status`, with `retry_after` if given), `slow` (sleep `delay_s`
    before answering), `truncate` (cut the JSON body in half), `drop` (close the connection
    without answering), `repeat` (serve the previous answer for this path again),
    `backwards` (rewrite the answer's next cursor to an earlier one).
    `skip` matching requests pass untouched first; then `times` requests get the fault.
    """

    path: str
    kind: str = "status"
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0
    times: int = 1
    skip: int = 0
    hits: int = 0


Handler = Callable[[Request], Response]


class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1 (port 0) in a daemon thread."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = []
        self._faults: list[Fault] = []
        self._last: dict[str, Response] = {}
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                req = Request(self.command, parts.path, query, {k.lower(): v for k, v in self.headers.items()}, body)
                server._handle(self, req)

            do_GET = do_POST = do_HEAD = _serve  # noqa: N815

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- routes and faults ---------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Callable[..., Response]) -> None:
        """`handler(request, **named_groups)` for paths fully matching the regex `pattern`."""
        self._routes.append((method.upper(), re.compile(pattern), handler))

    def add_json(self, path: str, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.route("GET", re.escape(path), lambda _req: Response(status, body, dict(headers or {})))

    def add_sequence(self, path: str, responses: list[Response], method: str = "GET") -> None:
        """Replay recorded responses in order (the last one repeats)."""
        queue = list(responses)

        def serve(_req: Request) -> Response:
            with self._lock:
                r = queue.pop(0) if len(queue) > 1 else queue[0]
            return Response(r.status, r.body, dict(r.headers))

        self.route(method, re.escape(path), serve)

    def add_bytes(self, path: str, data: bytes, content_type: str = "image/jpeg", status: int = 200, headers: dict[str, str] | None = None) -> str:
        hdrs = {"Content-Type": content_type, **(headers or {})}
        self.route("GET", re.escape(path), lambda _req: Response(status, data, dict(hdrs)))
        return f"{self.url}{path}" if self._httpd else path

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        self.route("GET", re.escape(path), lambda _req: Response(status, b"", {"Location": location}))

    def fault(self, path: str, kind: str = "status", **kwargs: Any) -> Fault:
        f = Fault(path=path, kind=kind, **kwargs)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hits(self, path_prefix: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    # --- dispatch ------------------------------------------------------------------------------

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if path.startswith(f.path) and f.hits < f.skip + f.times:
                    f.hits += 1
                    if f.hits > f.skip:
                        return f
                    return None
        return None

    def _dispatch(self, req: Request) -> Response:
        for method, pattern, handler in self._routes:
            if method == req.method or (req.method == "HEAD" and method == "GET"):
                m = pattern.fullmatch(req.path)
                if m:
                    return handler(req, **m.groupdict())
        return Response(404, {"error": "not found"})

    def _handle(self, h: BaseHTTPRequestHandler, req: Request) -> None:
        with self._lock:
            self.requests.append(req)
        fault = self._take_fault(req.path)
        if fault is not None and fault.kind == "drop":
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(2)
            return
        if fault is not None and fault.kind == "status":
            resp = Response(fault.status, {"error": f"injected HTTP {fault.status}"})
            if fault.retry_after is not None:
                resp.headers["Retry-After"] = fault.retry_after
        elif fault is not None and fault.kind == "repeat" and req.path in self._last:
            prev = self._last[req.path]
            resp = Response(prev.status, prev.body, dict(prev.headers))
        else:
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay_s)
            try:
                resp = self._dispatch(req)
            except Exception as exc:  # a bug in a fake handler: answer 500 rather than hang
                resp = Response(500, {"error": f"fake handler failed: {type(exc).__name__}: {exc}"})
            if fault is not None and fault.kind == "backwards":
                resp = self._backwards(resp, req)
            with self._lock:
                self._last[req.path] = Response(resp.status, resp.body, dict(resp.headers))
        data = resp.payload()
        if fault is not None and fault.kind == "truncate":
            data = data[: max(1, len(data) // 2)]
        h.send_response(resp.status)
        for k, v in resp.headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if req.method != "HEAD":
            with contextlib.suppress(OSError):
                h.wfile.write(data)

    def _backwards(self, resp: Response, req: Request) -> Response:
        """Point the next cursor back before this page (Link max_id above the request's, cursor/after to page one)."""
        headers = dict(resp.headers)
        if "Link" in headers:
            above = int(req.query.get("max_id") or 0) + (1 << 20)
            headers["Link"] = re.sub(r"max_id=(\d+)", lambda m: f"max_id={max(above, int(m.group(1)) + (1 << 20))}", headers["Link"])
        body = resp.body
        if isinstance(body, dict):
            body = json.loads(json.dumps(body))
            if "cursor" in body:
                body["cursor"] = "0"
            if isinstance(body.get("data"), dict) and "after" in body["data"]:
                body["data"]["after"] = None if body["data"]["after"] is None else "t3_" + "0"
        return Response(resp.status, body, headers)


# --- Mastodon --------------------------------------------------------------------------------------


def iso_ms(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def snowflake(when: dt.datetime, seq: int = 0) -> str:
    return str((int(when.timestamp() * 1000) << 16) | (seq & 0xFFFF))


CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _encode(number: int, alphabet: str, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, len(alphabet))
        out.append(alphabet[digit])
    return "".join(reversed(out))


def ulid(when: dt.datetime, seq: int = 0) -> str:
    """A GoToSocial id: a ULID, 48-bit ms time then 80 bits (here `seq`, not random), 26 chars
    of Crockford base32; sorts as text in time order."""
    return _encode((int(when.timestamp() * 1000) << 80) | (seq & ((1 << 80) - 1)), CROCKFORD, 26)


def flake(when: dt.datetime, seq: int = 0, worker: int = 0x5EED) -> str:
    """An Akkoma/Pleroma id: a 128-bit flake (64-bit ms time, 48-bit worker, 16-bit sequence) in
    base62, 18 chars for today's times; sorts as text in time order."""
    return _encode((int(when.timestamp() * 1000) << 64) | ((worker & 0xFFFFFFFFFFFF) << 16) | (seq & 0xFFFF), BASE62, 18)


def status_id(scheme: str, when: dt.datetime, seq: int = 0) -> str:
    """An id of `scheme`: snowflake (Mastodon), ulid (GoToSocial), flake (Akkoma/Pleroma) or
    serial (statuses from before Mastodon 2.0: small integers, here 1000 + seq)."""
    if scheme == "snowflake":
        return snowflake(when, seq)
    if scheme == "ulid":
        return ulid(when, seq)
    if scheme == "flake":
        return flake(when, seq)
    if scheme == "serial":
        return str(1000 + seq)
    raise ValueError(f"unknown id scheme {scheme!r}")


def mastodon_status(
    when: dt.datetime, text: str, *, seq: int = 0, account: str = "alice", tags: tuple[str, ...] = (),
    media: list[dict[str, Any]] | None = None, lang: str | None = "en", reblog: dict[str, Any] | None = None,
    instance: str = "https://social.example", sid: str | None = None,
) -> dict[str, Any]:
    """A Status entity as Mastodon's REST API returns it (the fields connectors read, and more);
    `sid` overrides the snowflake id (see `status_id` for the other servers' schemes)."""
    sid = sid or snowflake(when, seq)
    return {
        "id": sid,
        "created_at": iso_ms(when),
        "in_reply_to_id": None,
        "sensitive": False,
        "spoiler_text": "",
        "visibility": "public",
        "language": lang if reblog is None else None,
        "uri": f"{instance}/users/{account}/statuses/{sid}",
        "url": f"{instance}/@{account}/{sid}" if reblog is None else None,
        "replies_count": 0,
        "reblogs_count": 0,
        "favourites_count": 0,
        "content": "" if reblog is not None else f"<p>{text}</p>",
        "reblog": reblog,
        "account": {"id": str(zlib.crc32(account.encode())), "username": account, "acct": account, "url": f"{instance}/@{account}"},
        "media_attachments": [] if reblog is not None else (media or []),
        "mentions": [],
        "tags": [{"name": t, "url": f"{instance}/tags/{t}"} for t in tags],
    }


def mastodon_media(url: str | None, description: str | None = None, kind: str = "image", remote_url: str | None = None) -> dict[str, Any]:
    return {"id": str(zlib.crc32((url or remote_url or "").encode())), "type": kind, "url": url, "preview_url": url,
            "remote_url": remote_url, "description": description, "meta": {}}


class FakeMastodon(FakeServer):
    def __init__(self, statuses: list[dict[str, Any]] | None = None, max_limit: int = 40) -> None:
        super().__init__()
        self.statuses = list(statuses or [])
        self.max_limit = max_limit
        self.route("GET", r"/api/v1/timelines/tag/(?P<tag>[^/]+)", self._tag)
        self.route("GET", r"/api/v1/accounts/lookup", self._lookup)
        self.route("GET", r"/api/v1/accounts/(?P<aid>[^/]+)/statuses", self._account)

    def _key(self, value: str, numeric: bool) -> Any:
        return int(value) if numeric else value

    def _page(self, req: Request, items: list[dict[str, Any]]) -> Response:
        """A page as Mastodon-API servers serve it: ids compared as numbers when every id is
        numeric (Mastodon's bigints), else as strings (GoToSocial's ULIDs, Pleroma's flake ids
        are fixed-length and sort as text); `max_id`/`since_id`/`min_id` are exclusive bounds."""
        numeric = all(str(s["id"]).isdigit() for s in self.statuses)

        def bound(name: str) -> Any:
            value = req.query.get(name)
            if not value:
                return None
            if numeric and not value.isdigit():
                return None  # Mastodon ignores a bound it cannot read as an id
            return self._key(value, numeric)

        key = lambda s: self._key(str(s["id"]), numeric)  # noqa: E731
        items = sorted(items, key=key, reverse=True)
        q = req.query
        if (hi := bound("max_id")) is not None:
            items = [s for s in items if key(s) < hi]
        if (lo := bound("since_id")) is not None:
            items = [s for s in items if key(s) > lo]
        limit = min(int(q.get("limit") or 20), self.max_limit)
        if (mn := bound("min_id")) is not None:
            items = sorted((s for s in items if key(s) > mn), key=key)[:limit]
            items.reverse()
        else:
            items = items[:limit]
        headers = {}
        if items:
            base = f"{self.url}{req.path}"
            headers["Link"] = (
                f'<{base}?{urlencode({"limit": limit, "max_id": items[-1]["id"]})}>; rel="next", '
                f'<{base}?{urlencode({"limit": limit, "min_id": items[0]["id"]})}>; rel="prev"'
            )
        return Response(200, items, headers)

    def _tag(self, req: Request, tag: str) -> Response:
        tag = tag.lower()
        return self._page(req, [s for s in self.statuses if any(t["name"].lower() == tag for t in s.get("tags", []))])

    def _lookup(self, req: Request) -> Response:
        acct = req.query.get("acct", "")
        for s in self.statuses:
            if s["account"]["acct"] == acct:
                return Response(200, s["account"])
        return Response(404, {"error": "Record not found"})

    def _account(self, req: Request, aid: str) -> Response:
        return self._page(req, [s for s in self.statuses if s["account"]["id"] == aid])


# --- Bluesky ---------------------------------------------------------------------------------------


def bluesky_post(
    when: dt.datetime, text: str, *, did: str = "did:plc:alice", handle: str = "alice.bsky.social", rkey: str | None = None,
    images: list[dict[str, Any]] | None = None, with_record: bool = False, langs: tuple[str, ...] = ("en",),
    indexed_at: dt.datetime | None = None, created_at: str | None = None,
) -> dict[str, Any]:
    """An app.bsky.feed.defs#postView; `images` as [{"fullsize", "thumb", "alt"}]."""
    rkey = rkey or f"3k{int(when.timestamp() * 1000):x}"
    view: dict[str, Any] = {
        "uri": f"at://{did}/app.bsky.feed.post/{rkey}",
        "cid": f"bafyrei{rkey}",
        "author": {"did": did, "handle": handle, "displayName": handle.split(".")[0].title()},
        "record": {"$type": "app.bsky.feed.post", "text": text, "createdAt": created_at or iso_ms(when), "langs": list(langs)},
        "replyCount": 0, "repostCount": 0, "likeCount": 0,
        "indexedAt": iso_ms(indexed_at or when),
        "labels": [],
    }
    if images:
        imgs = {"$type": "app.bsky.embed.images#view", "images": [
            {"thumb": i.get("thumb", i["fullsize"]), "fullsize": i["fullsize"], "alt": i.get("alt", "")} for i in images
        ]}
        if with_record:
            view["embed"] = {"$type": "app.bsky.embed.recordWithMedia#view",
                             "record": {"record": {"$type": "app.bsky.embed.record#viewRecord", "uri": "at://did:plc:x/app.bsky.feed.post/q"}},
                             "media": imgs}
        else:
            view["embed"] = imgs
    return view


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class FakeBluesky(FakeServer):
    def __init__(self, posts: list[dict[str, Any]] | None = None, identifier: str = "brandmon.bsky.social",
                 password: str = "app-pass-1234", max_limit: int = 100, overlap: int = 0) -> None:
        super().__init__()
        self.posts = list(posts or [])
        self.identifier, self.password = identifier, password
        self.max_limit = max_limit
        self.overlap = overlap
        self.tokens: set[str] = set()
        self.sessions = 0
        self.route("POST", r"/xrpc/com\.atproto\.server\.createSession", self._session)
        self.route("GET", r"/xrpc/app\.bsky\.feed\.searchPosts", self._search)

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def _session(self, req: Request) -> Response:
        body = req.json() or {}
        if body.get("identifier") != self.identifier or body.get("password") != self.password:
            return Response(401, {"error": "AuthenticationRequired", "message": "Invalid identifier or password"})
        with self._lock:
            self.sessions += 1
            token = f"jwt-access-{self.sessions}-{base64.b32encode(self.password.encode()).decode()[:8]}"
            self.tokens.add(token)
        return Response(200, {"accessJwt": token, "refreshJwt": token + "-refresh", "did": "did:plc:brandmon", "handle": self.identifier})

    def _search(self, req: Request) -> Response:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return Response(401, {"error": "AuthMissing", "message": "Authentication Required"})
        if auth[7:] not in self.tokens:
            return Response(400, {"error": "ExpiredToken", "message": "Token has expired"})
        q = req.query.get("q", "").lower()
        if not q:
            return Response(400, {"error": "InvalidRequest", "message": "Error: Params must have the property \"q\""})

        def sort_at(p: dict[str, Any]) -> dt.datetime:
            return min(_ts(p["record"]["createdAt"]), _ts(p["indexedAt"])) if _valid(p["record"]["createdAt"]) else _ts(p["indexedAt"])

        items = [p for p in self.posts if q.lstrip("#") in p["record"]["text"].lower()]
        if req.query.get("since"):
            items = [p for p in items if sort_at(p) >= _ts(req.query["since"])]
        if req.query.get("until"):
            items = [p for p in items if sort_at(p) < _ts(req.query["until"])]
        items.sort(key=lambda p: (sort_at(p), p["uri"]), reverse=True)
        offset = int(req.query.get("cursor") or 0)
        limit = min(int(req.query.get("limit") or 25), self.max_limit)
        if offset and self.overlap:  # new posts pushed the list down: the page repeats the last ones
            offset = max(0, offset - min(self.overlap, limit - 1))
        page = items[offset : offset + limit]
        body: dict[str, Any] = {"posts": page, "hitsTotal": len(items)}
        if offset + limit < len(items):
            body["cursor"] = str(offset + limit)
        return Response(200, body)


def _valid(value: str) -> bool:
    try:
        _ts(value)
        return True
    except ValueError:
        return False


# --- Reddit ----------------------------------------------------------------------------------------


def reddit_post(
    when: dt.datetime, title: str, *, pid: str, subreddit: str = "brands", author: str = "bob", selftext: str = "",
    url: str | None = None, preview: str | None = None, gallery: list[str] | None = None, crosspost_parent: str | None = None,
) -> dict[str, Any]:
    """A t3 listing child as Reddit's JSON API returns it (with `raw_json=1`)."""
    data: dict[str, Any] = {
        "id": pid, "name": f"t3_{pid}", "subreddit": subreddit, "title": title, "selftext": selftext,
        "author": author, "author_fullname": f"t2_{zlib.crc32(author.encode()):x}", "created_utc": when.timestamp(),
        "permalink": f"/r/{subreddit}/comments/{pid}/post/", "url": url or f"https://www.reddit.com/r/{subreddit}/comments/{pid}/post/",
        "is_self": url is None, "over_18": False, "score": 1, "num_comments": 0,
    }
    if url and re.search(r"\.(jpe?g|png|gif|webp)$", url):
        data["post_hint"] = "image"
    if preview:
        data["preview"] = {"images": [{"source": {"url": preview, "width": 10, "height": 10}, "resolutions": []}], "enabled": True}
    if gallery:
        data["is_gallery"] = True
        data["gallery_data"] = {"items": [{"media_id": f"m{i}", "id": i} for i in range(len(gallery))]}
        data["media_metadata"] = {f"m{i}": {"status": "valid", "e": "Image", "m": "image/jpg", "s": {"u": u, "x": 10, "y": 10}} for i, u in enumerate(gallery)}
    if crosspost_parent:
        data["crosspost_parent"] = crosspost_parent
    return {"kind": "t3", "data": data}


class FakeReddit(FakeServer):
    def __init__(self, posts: list[dict[str, Any]] | None = None, client_id: str | None = None, client_secret: str | None = None,
                 max_limit: int = 100, overlap: int = 0, token_ttl: int = 86400) -> None:
        super().__init__()
        self.posts = list(posts or [])
        self.client_id, self.client_secret = client_id, client_secret
        self.max_limit = max_limit
        self.overlap = overlap
        self.token_ttl = token_ttl  # seconds, sent as `expires_in` and enforced
        self.tokens: set[str] = set()
        self._expiry: dict[str, float] = {}
        self.issued = 0
        self.refused = 0  # listing requests answered 401
        self.user_agents: list[str] = []
        self.route("GET", r"/r/(?P<sub>[^/]+)/new\.json", self._new)
        self.route("GET", r"/r/(?P<sub>[^/]+)/search\.json", self._search)
        self.route("GET", r"/search\.json", self._search)
        self.route("POST", r"/api/v1/access_token", self._token)

    def _token(self, req: Request) -> Response:
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if req.headers.get("authorization") != expected or b"grant_type=client_credentials" not in req.body:
            return Response(401, {"message": "Unauthorized", "error": 401})
        with self._lock:
            self.issued += 1
            token = f"reddit-token-{self.issued}"
            self.tokens.add(token)
            self._expiry[token] = time.monotonic() + self.token_ttl
        return Response(200, {"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl, "scope": "*"})

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (as after `expires_in`)."""
        with self._lock:
            self._expiry = dict.fromkeys(self._expiry, 0.0)

    def _authorised(self, req: Request) -> bool:
        self.user_agents.append(req.headers.get("user-agent", ""))
        if self.client_id is None:
            return True
        auth = req.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        with self._lock:
            ok = token in self.tokens and self._expiry.get(token, 0.0) > time.monotonic()
            self.refused += not ok
        return ok

    def _listing(self, req: Request, items: list[dict[str, Any]]) -> Response:
        if not self._authorised(req):
            return Response(401, {"message": "Unauthorized", "error": 401}, {"www-authenticate": 'Bearer realm="reddit", error="invalid_token"'})
        items = sorted(items, key=lambda c: (c["data"]["created_utc"], c["data"]["id"]), reverse=True)
        after = req.query.get("after")
        limit = min(int(req.query.get("limit") or 25), self.max_limit)
        if after:
            names = [c["data"]["name"] for c in items]
            items = items[max(0, names.index(after) + 1 - min(self.overlap, limit - 1)) :] if after in names else []
        page = items[:limit]
        nxt = page[-1]["data"]["name"] if len(items) > limit and page else None
        return Response(200, {"kind": "Listing", "data": {"after": nxt, "dist": len(page), "before": None, "children": page}})

    def _new(self, req: Request, sub: str) -> Response:
        return self._listing(req, [c for c in self.posts if c["data"]["subreddit"].lower() == sub.lower()])

    def _search(self, req: Request, sub: str | None = None) -> Response:
        q = req.query.get("q", "").lower()
        items = [c for c in self.posts if q in (c["data"]["title"] + " " + c["data"]["selftext"]).lower()]
        if sub is not None and req.query.get("restrict_sr") in ("1", "true", "on"):
            items = [c for c in items if c["data"]["subreddit"].lower() == sub.lower()]
        return self._listing(req, items)


# --- hostile servers -------------------------------------------------------------------------------


def gzip_bomb(decoded_bytes: int, encoding: str = "gzip") -> bytes:
    """A small gzip (or zlib `deflate`) body that expands to `decoded_bytes` zero bytes."""
    obj = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    parts, left = [], decoded_bytes
    while left > 0:
        parts.append(obj.compress(block[: min(left, len(block))]))
        left -= len(block)
    parts.append(obj.flush())
    return b"".join(parts)


Behaviour = Callable[[BaseHTTPRequestHandler, threading.Event], None]


class HostileServer:
    """An HTTP server on 127.0.0.1 whose routes misbehave at the byte level: drip headers or a
    body one byte at a time, lie about Content-Length, stream chunks for ever, redirect in a loop.

    `add(path, behaviour)` where `behaviour(handler, stopping)` writes raw bytes to
    `handler.wfile`; the helpers below build the usual ones. Loops end when the client goes
    away or the server stops (`stopping` is set), so a test never leaves a thread dripping.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Behaviour] = {}
        self.hits: dict[str, int] = {}
        self.stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> HostileServer:
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path
                outer.hits[path] = outer.hits.get(path, 0) + 1
                behaviour = outer.routes.get(path)
                self.close_connection = True
                try:
                    if behaviour is None:
                        self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    else:
                        behaviour(self, outer.stopping)
                except OSError:  # the client gave up: that is the point
                    pass

            do_POST = do_GET  # noqa: N815

        self._httpd = ThreadingHTTPServer((self.host, 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        threading.Thread(target=self._httpd.serve_forever, name="hostile-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def add(self, path: str, behaviour: Behaviour) -> str:
        self.routes[path] = behaviour
        return f"{self.url}{path}" if self._httpd else path


def _head(status: str, headers: dict[str, str]) -> bytes:
    # The server closes every connection after one answer; saying so keeps a client from reusing
    # the socket for the next redirect hop (under load that raced the FIN: a flaky ConnectionError).
    headers = {"Connection": "close", **headers}
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def drip_headers(every_s: float = 1.0, status: str = "200 OK") -> Behaviour:
    """The status line, then one header byte every `every_s`, for ever (slowloris in reverse)."""

    def run(h: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        h.wfile.write(f"HTTP/1.1 {status}\r\nX-Slow: ".encode())
        while not stopping.wait(every_s):
            h.wfile.write(b"a")

    return run


def drip_body(body: bytes, every_s: float = 1.0, headers: dict[str, str] | None = None, status: str = "200 OK") -> Behaviour:
    """Honest headers (with Content-Length), then the body one byte every `every_s`."""

    def run(h: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        h.wfile.write(_head(status, {"Content-Length": str(len(body)), **(headers or {})}))
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            if stopping.wait(every_s):
                return

    return run


def send(body: bytes, headers: dict[str, str] | None = None, status: str = "200 OK", delay_s: float = 0.0,
         length: int | None = None, then_hold: bool = False) -> Behaviour:
    """Headers (Content-Length: `length` if given, a lie, else the truth) and `body` at once,
    after `delay_s`; `then_hold` keeps the connection open afterwards without a byte more."""

    def run(h: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        if delay_s and stopping.wait(delay_s):
            return
        h.wfile.write(_head(status, {"Content-Length": str(len(body) if length is None else length), **(headers or {})}) + body)
        if then_hold:
            stopping.wait(600)

    return run


def chunked_forever(chunk: bytes = b" " * 65536, headers: dict[str, str] | None = None, every_s: float = 0.0) -> Behaviour:
    """`Transfer-Encoding: chunked`, the same chunk again and again, never the last chunk."""

    def run(h: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        h.wfile.write(_head("200 OK", {"Transfer-Encoding": "chunked", "Content-Type": "application/json", **(headers or {})}))
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while not stopping.is_set():
            h.wfile.write(framed)
            if every_s and stopping.wait(every_s):
                return

    return run


def redirect(location: str, delay_s: float = 0.0, status: str = "302 Found") -> Behaviour:
    return send(b"", {"Location": location}, status=status, delay_s=delay_s)
