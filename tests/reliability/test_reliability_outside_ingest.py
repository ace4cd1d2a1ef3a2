"""What an outside tester found in ingestion (issue 11, attacked with the README as the only
guide), each as a case that failed before its fix: a CSV field over the limit that read the
rest of its field as junk rows and swallowed the good row after it, an Excel-style byte order
mark on CSV and JSON-array exports, Mastodon-API servers that send no `Link` header, and a
Reddit listing with one stale post on its first page. Export cases run on SQLite + a local
folder and on Postgres + S3; feed servers listen on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from typing import Any

import pytest
from test_reliability_hostile_archive import GOOD, cfg, export, good_lines, quarantined, stored, z  # noqa: F401

from pipeline.ingest.jobs import ingest_window
from pipeline.settings import NetworkConfig, Settings, SourceConfig
from pipeline.sources.registry import make_connector
from tests.support.feeds import (
    FakeMastodon,
    FakeReddit,
    Request,
    Response,
    mastodon_status,
    reddit_post,
    status_id,
)

pytestmark = pytest.mark.timeout(300)  # a hang is a failure
DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
END = DAY + dt.timedelta(days=1)


def csv_rows(ids: list[str], hour: int) -> bytes:
    return "".join(f"{i},u{n},acme {i},{z(DAY + dt.timedelta(hours=hour, minutes=n))}\r\n" for n, i in enumerate(ids)).encode()


def test_csv_field_over_the_limit_is_one_row_and_the_next_row_goes_in(make_ctx, backend, export, tally):  # noqa: F811
    """A quoted field over the field limit spanning many lines (a notes column pasted in, or a
    hostile file), then good rows: one quarantine row for the bad record, its later lines are
    not read as rows, and the good row right after it is stored. The same for a line over
    `max_row_bytes` inside a quoted field."""
    cap = 4096
    field = ("x" * 200 + "\r\n") * 100  # 20 KB over 100 lines, no quote inside
    long_line = "y" * (cap * 3)  # one line over max_row_bytes, inside a quoted field
    head = "id,author_id,text,created_at\r\n"
    body = (head + csv_rows(["before"], 1).decode()
            + f'big,u,"{field}",{z(DAY)}\r\n' + csv_rows(["after-big"], 2).decode()
            + f'long,u,"a\r\n{long_line}\r\nb",{z(DAY)}\r\n' + csv_rows(["after-long", "last"], 3).decode())
    export.put("notes.csv", body.encode())
    export.put("notes.csv.gz", gzip.compress(body.replace("before", "gz-before").replace("after", "gz-after")
                                             .replace("last", "gz-last").encode()))
    ctx = make_ctx(cfg(path=export.path, max_row_bytes=cap), backend)
    counts = ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    assert set(found) == {"before", "after-big", "after-long", "last", "gz-before", "gz-after-big", "gz-after-long", "gz-last"}, (sorted(found), q)
    assert len(q) == 4, q  # one per bad record, per file: no junk rows from the field's lines
    for ref, reason in q.items():
        assert ("field larger than field limit" in reason or "longer than max_row_bytes" in reason) and "skipped" in reason, (ref, reason)
    assert counts["rejected"] == 4 and counts["new"] == 8, counts
    tally.bad_input("quarantined", 4)
    tally.rows(len(found))


def test_byte_order_mark_on_csv_and_json_array_exports(make_ctx, backend, export, tally):  # noqa: F811
    """Excel's "CSV UTF-8" starts with a byte order mark; so do some JSON exports. The CSV's
    first column is still `id` and a `.json` array is still read as an array: every row stored."""
    bom = "\ufeff".encode()
    export.put("excel.csv", bom + b"id,author_id,text,created_at\r\n" + csv_rows(["c1", "c2"], 1))
    export.put("excel.csv.gz", gzip.compress(bom + b"id,author_id,text,created_at\r\n" + csv_rows(["c3"], 2)))
    rows = [json.loads(line) for line in good_lines("arr").splitlines()]
    export.put("array.json", bom + json.dumps(rows).encode())
    export.put("array2.json", b"\n " + bom + json.dumps(rows[:1]).replace('"arr-0"', '"arr-x"').encode())
    ctx = make_ctx(cfg(path=export.path), backend)
    ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    assert not q, q
    assert set(found) == {"c1", "c2", "c3", "arr-x"} | {f"arr-{i}" for i in range(GOOD)}, sorted(found)
    tally.bad_input("stored", 4)
    tally.rows(len(found))


# --- feeds ------------------------------------------------------------------------------------------


def _connector(kind: str, url: str, **options: Any):  # type: ignore[no-untyped-def]
    s = Settings(database_url="sqlite://", storage_url="/tmp/x", network=NetworkConfig(max_retries=1, timeout_s=5))
    src = SourceConfig(name="src", kind=kind, options={"base_url": url, "backoff_s": 0.01, **options})
    return make_connector(s, src, sleep=lambda _s: None)


class NoLinkMastodon(FakeMastodon):
    """A server of the Mastodon API that pages by `max_id` but sends no `Link` header."""

    def _page(self, req: Request, items: list[dict[str, Any]]) -> Response:
        resp = super()._page(req, items)
        resp.headers.pop("Link", None)
        return resp


@pytest.mark.parametrize("scheme", ["snowflake", "ulid", "serial"])
def test_mastodon_server_without_link_headers_is_read_to_the_end(scheme, tally):
    """Without `Link` headers the walk used to stop after the first page (7 of 24 statuses,
    no warning: something was stored). A full page now continues with `max_id` = its lowest id."""
    items = [mastodon_status(DAY - dt.timedelta(hours=6) + dt.timedelta(minutes=60 * i), f"acme {i}", seq=i, tags=("acme",),
                             sid=status_id(scheme, DAY - dt.timedelta(hours=6) + dt.timedelta(minutes=60 * i), i)) for i in range(36)]
    want = {s["id"] for s in items if z(DAY)[:19] <= s["created_at"][:19] < z(END)[:19]}
    assert len(want) == 24
    with NoLinkMastodon(items, max_limit=7) as srv:
        c = _connector("mastodon", srv.url, hashtags=["acme"], limit=7)
        got = {r["id"] for p in c.pages(DAY, END) for r in (p.records or [])}
    assert want <= got, f"{scheme}: lost {len(want - got)} of {len(want)}"
    tally.bad_input("stored")


class StaleFirstReddit(FakeReddit):
    """A listing whose first page holds one old post among new ones (e.g. approved late)."""

    def _listing(self, req: Request, items: list[dict[str, Any]]) -> Response:
        resp = super()._listing(req, items)
        if not req.query.get("after"):
            stale = reddit_post(DAY - dt.timedelta(days=400), "old acme", pid="stale")
            resp.body["data"]["children"].insert(1, stale)
        return resp


def test_reddit_one_stale_post_does_not_end_the_walk(tally):
    """The walk stops at a page wholly older than the window, not at the first old post: the
    in-window posts of later pages were lost (no warning, as page one stored some)."""
    posts = [reddit_post(END - dt.timedelta(minutes=50 * i + 10), f"acme {i}", pid=f"p{i}") for i in range(40)]
    want = {f"p{i}" for i in range(40) if END - dt.timedelta(minutes=50 * i + 10) >= DAY}
    with StaleFirstReddit(posts, max_limit=6) as srv:
        c = _connector("reddit", srv.url, subreddits=["brands"], limit=6)
        got = {r["data"]["id"] for p in c.pages(DAY, END) for r in (p.records or [])}
    assert want <= got, f"lost {sorted(want - got)[:5]}"
    tally.bad_input("stored")
