"""Hostile and careless network input, tried from outside (issue 11, classes 3 and 5): servers
on 127.0.0.1 that drip bytes, bomb, lie and loop, and Mastodon-API servers whose ids are not
snowflakes. Each case asserts bounded time (hard pytest timeouts: a hang is a failure) and,
where a bomb could take the machine down, bounded memory in a child process under RLIMIT_AS;
and that the rest of the window is stored, on SQLite + folder and Postgres + S3.
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import ipaddress
import json
import logging
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import DAY, END, CountingServer, jpeg, spawn
from sqlalchemy import select

from pipeline.errors import BrandmonError
from pipeline.ingest import netguard
from pipeline.ingest.cli import format_counts
from pipeline.ingest.jobs import ingest_window
from pipeline.schema import post_images, posts, runs
from pipeline.status import format_status
from tests.support.feeds import (
    FakeMastodon,
    FakeReddit,
    HostileServer,
    chunked_forever,
    drip_body,
    drip_headers,
    gzip_bomb,
    mastodon_media,
    mastodon_status,
    reddit_post,
    redirect,
    send,
    status_id,
)

MB = 1024 * 1024
DEADLINE = 1.0
TAG = "/api/v1/timelines/tag/acme"
BRANDS = [{"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"]}]


def network(**kw: Any) -> dict[str, Any]:
    return {"max_retries": 1, "timeout_s": 5, "deadline_s": DEADLINE, "max_response_bytes": 4 * MB, "image_workers": 4,
            "per_host_connections": 2, "allowed_private_hosts": ["127.0.0.1"], **kw}


def masto(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "mastodon", "base_url": url, "hashtags": ["acme"], "limit": 10, "backoff_s": 0.01, **kw}


def stored(ctx: Any, source: str | None = None) -> set[str]:
    with ctx.engine.connect() as conn:
        q = select(posts.c.external_id)
        if source:
            q = q.where(posts.c.source == source)
        return {r for (r,) in conn.execute(q)}


def image_outcomes(ctx: Any) -> dict[str, tuple[str, str | None]]:
    with ctx.engine.connect() as conn:
        return {u: (s, r) for u, s, r in conn.execute(select(post_images.c.url, post_images.c.status, post_images.c.reason))}


def last_run(ctx: Any) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        return dict(conn.execute(select(runs).order_by(runs.c.id.desc()).limit(1)).mappings().one())


# --- class 3: silent zero ------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["ulid", "flake", "serial"])
def test_non_snowflake_mastodon_servers_are_ingested_by_default(make_ctx, backend, tally, scheme):
    """GoToSocial, Akkoma/Pleroma and pre-2.0 ids with the default options. Fails on the old
    code: 0 posts stored, no warning."""
    items = []
    for i in range(40):
        when = DAY - dt.timedelta(hours=12) + dt.timedelta(minutes=50 * i)
        items.append(mastodon_status(when, f"acme {i}", seq=i, tags=("acme",), sid=status_id(scheme, when, i)))
    want = {s["id"] for s in items if DAY.isoformat()[:10] == s["created_at"][:10]}
    with FakeMastodon(items, max_limit=10) as srv:
        ctx = make_ctx({"brands": BRANDS, "sources": [masto("gts", srv.url, fetch_images=False)], "network": network()}, backend)
        counts = ingest_window(ctx, "gts", DAY, END)
    tally.bad_input("stored")
    assert stored(ctx) >= {f"{w}" for w in want} or len(stored(ctx)) == len(want), counts
    assert counts["new"] == len(want) and "warning" not in counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mastodon", "reddit"])
def test_window_that_fetched_items_but_stored_nothing_says_so_loudly(make_ctx, backend, tally, caplog, kind):
    """A server whose every item is outside the window (a clock off by a year): the run succeeds
    but warns, in the log, the run log row, `brandmon status` and the CLI summary."""
    year_before = DAY - dt.timedelta(days=365)
    if kind == "mastodon":
        srv: Any = FakeMastodon([mastodon_status(year_before + dt.timedelta(minutes=i), f"acme {i}", seq=i, tags=("acme",))
                                 for i in range(12)], max_limit=5)
        source = masto("src", "", id_mode="time", fetch_images=False)
    else:
        srv = FakeReddit([reddit_post(DAY - dt.timedelta(days=365, minutes=i), f"acme {i}", pid=f"p{i}") for i in range(12)])
        source = {"name": "src", "kind": "reddit", "subreddits": ["brands"], "backoff_s": 0.01, "fetch_images": False}
    with srv:
        source["base_url"] = srv.url
        ctx = make_ctx({"brands": BRANDS, "sources": [source], "network": network()}, backend)
        with caplog.at_level(logging.WARNING, logger="pipeline.ingest.jobs"):
            counts = ingest_window(ctx, "src", DAY, END)
    tally.bad_input("warned")
    assert counts["fetched"] > 0 and counts["new"] == 0 and counts["silent_zero"] == 1
    assert counts["warning"].startswith(f"fetched {counts['fetched']} items, stored 0, quarantined 0: ")
    assert any("stored 0, quarantined 0" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    row = last_run(ctx)
    assert row["status"] == "succeeded" and row["counts"]["warning"] == counts["warning"]
    assert "WARNING: fetched" in format_counts(counts)
    status = format_status({"settings": {"database_url": "x", "storage_url": "y", "s3_endpoint_url": None, "config": None,
                                         "brands": [], "sources": []}, "problems": [], "recent_runs": [row]})
    assert "WARNING: fetched" in status


def test_no_warning_for_an_empty_window_or_a_window_that_stored(make_ctx):
    with FakeMastodon([mastodon_status(DAY + dt.timedelta(hours=1), "acme", tags=("acme",))], max_limit=5) as srv:
        ctx = make_ctx({"brands": BRANDS, "sources": [masto("m", srv.url, fetch_images=False)], "network": network()})
        assert "silent_zero" not in ingest_window(ctx, "m", DAY, END)
        assert "silent_zero" not in ingest_window(ctx, "m", END, END + dt.timedelta(days=1))


# --- class 5: unbounded work, images -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_hostile_images_cannot_hold_the_window(make_ctx, backend, tally):
    """One post per hostile image URL beside good ones. Every bad image ends failed or
    quarantined with its reason within the deadline; every post and good image is stored.
    On the old code the dripping URLs held the window for minutes (pytest timeout)."""
    with HostileServer() as bad, HostileServer("127.0.0.2") as private, FakeMastodon(max_limit=10) as srv:
        good = srv.add_bytes("/good.jpg", jpeg(1))
        html = b"<html>login</html>"
        cases = {
            bad.add("/drip-headers.jpg", drip_headers(0.2)): ("failed", "deadline"),
            bad.add("/drip-body.jpg", drip_body(jpeg(2), 0.2, {"Content-Type": "image/jpeg"})): ("failed", "deadline"),
            bad.add("/bomb.jpg", send(gzip_bomb(64 * MB), {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})): ("quarantined", "once decoded"),
            bad.add("/deflate.jpg", send(gzip_bomb(64 * MB, "deflate"), {"Content-Type": "image/jpeg", "Content-Encoding": "deflate"})): ("quarantined", "once decoded"),
            bad.add("/lie.jpg", send(jpeg(3), {"Content-Type": "image/jpeg"}, length=50 * 1024**3)): ("quarantined", "Content-Length"),
            bad.add("/endless.jpg", chunked_forever()): ("quarantined", "too large"),
            bad.add("/loop.jpg", redirect("/loop.jpg")): ("quarantined", "redirects"),
            bad.add("/slowloris-redirect.jpg", redirect("/drip-headers.jpg", delay_s=0.5)): ("failed", "deadline"),
            bad.add("/private-after-slow-start.jpg", redirect(f"{private.url}/x.jpg", delay_s=0.5)): ("quarantined", "non-public"),
            bad.add("/html-as-jpeg.jpg", send(html, {"Content-Type": "image/jpeg"})): ("quarantined", "HTML"),
            bad.add("/jpeg-as-html.jpg", send(jpeg(4), {"Content-Type": "text/html"})): ("stored", None),
            bad.add("/br.jpg", send(b"\x0b\x02\x80", {"Content-Type": "image/jpeg", "Content-Encoding": "br"})): ("quarantined", "Content-Encoding"),
        }
        private.add("/x.jpg", send(jpeg(5), {"Content-Type": "image/jpeg"}))
        statuses = [mastodon_status(DAY + dt.timedelta(minutes=10 * i), f"acme {i}", seq=i, tags=("acme",),
                                    media=[mastodon_media(url)]) for i, url in enumerate([*cases, good])]
        srv.statuses = statuses
        ctx = make_ctx({"brands": BRANDS, "sources": [masto("m", srv.url)], "network": network()}, backend)
        t0 = time.monotonic()
        counts = ingest_window(ctx, "m", DAY, END)
        elapsed = time.monotonic() - t0
        assert private.hits == {}
    tally.fault("hostile image server", len(cases))
    assert stored(ctx) == {s["id"] for s in statuses}, "every post of the window is stored"
    got = image_outcomes(ctx)
    assert got[good] == ("stored", None)
    for url, (status, reason) in cases.items():
        assert got[url][0] == status, (url, got[url])
        if reason:
            assert reason in (got[url][1] or ""), (url, got[url])
    # 4 workers, 2 per host: the slow URLs queue behind each other, each bounded by the deadline.
    assert elapsed < 8 * DEADLINE + 10, f"window took {elapsed:.1f}s"
    assert counts["images_stored"] == 2


# --- class 5: unbounded work, feeds ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["headers", "body", "token"])
def test_dripping_feed_fails_within_its_deadline_and_other_sources_store(make_ctx, tally, where):
    """A feed (or Reddit's OAuth token endpoint) that drips bytes: the window fails with the
    deadline as its reason after max_retries + 1 bounded attempts. Old code: hung."""
    with HostileServer() as bad, FakeMastodon([mastodon_status(DAY + dt.timedelta(hours=2), "acme ok", tags=("acme",))]) as ok:
        if where == "token":
            bad.add("/api/v1/access_token", drip_headers(0.1))
            src = {"name": "bad", "kind": "reddit", "subreddits": ["brands"], "oauth_base_url": bad.url,
                   "auth_url": f"{bad.url}/api/v1/access_token", "client_id_env": "T_RID", "client_secret_env": "T_RSEC",
                   "backoff_s": 0.01}
        else:
            bad.add(TAG, drip_headers(0.1) if where == "headers" else drip_body(b"[" + b" " * 10_000 + b"]", 0.1))
            src = masto("bad", bad.url, id_mode="time")
        import os

        os.environ["T_RID"], os.environ["T_RSEC"] = "client-id", "client-secret-123"
        ctx = make_ctx({"brands": BRANDS, "sources": [src, masto("good", ok.url, fetch_images=False)], "network": network()})
        t0 = time.monotonic()
        with pytest.raises(BrandmonError, match=r"exceeded the 1 s deadline for the whole request after 2 attempts"):
            ingest_window(ctx, "bad", DAY, END)
        elapsed = time.monotonic() - t0
        ingest_window(ctx, "good", DAY, END)
    tally.fault(f"dripping feed {where}")
    assert elapsed < 2 * DEADLINE + 2.5, f"{elapsed:.1f}s"
    assert last_run(ctx)["status"] == "succeeded" and len(stored(ctx, "good")) == 1
    assert stored(ctx, "bad") == set()


@pytest.mark.timeout(60)
def test_feed_json_nested_100k_deep_under_gzip(make_ctx, tally):
    """Fails the window at once with one line (old code: a RecursionError)."""
    with HostileServer() as bad:
        bad.add(TAG, send(gzip.compress(b"[" * 100_000 + b"]" * 100_000), {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
        ctx = make_ctx({"brands": BRANDS, "sources": [masto("bad", bad.url, id_mode="time")], "network": network()})
        with pytest.raises(BrandmonError, match="response refused: JSON nested too deeply") as err:
            ingest_window(ctx, "bad", DAY, END)
    tally.bad_input("failed cleanly")
    assert "RecursionError" not in str(err.value) and bad.hits[TAG] == 1


CHILD = """
import json, resource, sys, datetime as dt
from pipeline.context import open_context
from pipeline.errors import BrandmonError
from pipeline.ingest.jobs import ingest_window
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 1024 * 2**20, resource.RLIM_INFINITY))  # 1 GiB more than after imports
start, end = dt.datetime.fromisoformat(sys.argv[1]), dt.datetime.fromisoformat(sys.argv[2])
ctx = open_context()
out = {}
for src in sys.argv[3:]:
    try:
        out[src] = ingest_window(ctx, src, start, end)
    except BrandmonError as exc:
        out[src] = {"error": str(exc)}
    except MemoryError:
        out[src] = {"error": "MemoryError"}
# VmHWM is this process's own peak: ru_maxrss after exec also counts the forked copy of the
# (possibly large) pytest parent, which said 12 GB on CI for a child that never grew.
out["maxrss_mb"] = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=2)
def two_gib_bomb(encoding: str) -> bytes:
    """2 GiB of zeros: 32 gzip members of 64 MiB (cheap), or one 2 GiB deflate stream (~20 s, once)."""
    return gzip_bomb(64 * MB, "gzip") * 32 if encoding == "gzip" else gzip_bomb(2048 * MB, "deflate")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("bomb", ["gzip", "deflate", "chunked-forever", "content-length-lie"])
def test_feed_bombs_in_a_memory_capped_child(make_ctx, backend, tally, bomb):
    """A feed answering with a 2 GiB gzip/deflate body, an endless chunked body or a 50 GB
    Content-Length, ingested in a child whose address space is capped at 1 GiB over its
    imports. The bad source fails with the cap as its reason, the good one is stored, and the
    child's peak RSS stays far below the bomb. Old code: MemoryError (or unbounded reading)."""
    json_h = {"Content-Type": "application/json"}
    with HostileServer() as bad, FakeMastodon([mastodon_status(DAY + dt.timedelta(hours=3), "acme fine", tags=("acme",))]) as ok:
        if bomb in ("gzip", "deflate"):
            bad.add(TAG, send(two_gib_bomb(bomb), {**json_h, "Content-Encoding": bomb}))
        elif bomb == "chunked-forever":
            bad.add(TAG, chunked_forever(b"[" + b" " * 65534 + b"]"))
        else:
            bad.add(TAG, send(b"[]" * 1000, json_h, length=50 * 1024**3, then_hold=True))
        ctx = make_ctx({"brands": BRANDS, "sources": [masto("bad", bad.url, id_mode="time"), masto("good", ok.url, fetch_images=False)],
                        "network": network(max_response_bytes=32 * MB, deadline_s=20)}, backend)
        proc = spawn(ctx, CHILD, DAY.isoformat(), END.isoformat(), "bad", "good", MALLOC_ARENA_MAX="2")
        out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    tally.fault(f"feed bomb {bomb}")
    assert "error" in result["bad"] and "response refused" in result["bad"]["error"], result
    assert "MemoryError" not in result["bad"]["error"]
    assert result["good"]["new"] == 1 and stored(ctx, "good")
    assert result["maxrss_mb"] < 600, result


# --- URL guard properties -------------------------------------------------------------------------

PRIVATE_V4 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                                                  "192.168.0.0/16", "100.64.0.0/10", "0.0.0.0/8")]


def v4_forms(ip: ipaddress.IPv4Address, form: str) -> str:
    """Spellings of an IPv4 address that resolvers accept: dotted, decimal, hex, octal, short."""
    n = int(ip)
    a, b, c, d = ip.packed
    return {
        "dotted": str(ip),
        "decimal": str(n),
        "hex": hex(n),
        "octal-dotted": ".".join(f"0{x:o}" for x in (a, b, c, d)),
        "short": f"{a}.{(b << 16) | (c << 8) | d}",
        "short2": f"{a}.{b}.{(c << 8) | d}",
        "ipv6-mapped": f"[::ffff:{ip}]",
        "ipv6-mapped-hex": f"[::ffff:{(a << 8) | b:x}:{(c << 8) | d:x}]",
    }[form]


@settings(max_examples=300, deadline=None)
@given(net=st.sampled_from(PRIVATE_V4), offset=st.integers(0, 2**24), form=st.sampled_from(
    ["dotted", "decimal", "hex", "octal-dotted", "short", "short2", "ipv6-mapped", "ipv6-mapped-hex"]),
    scheme=st.sampled_from(["http", "https", "HTTP"]), port=st.sampled_from(["", ":80", ":8080"]), path=st.sampled_from(["", "/", "/a.jpg?x=1"]))
def test_property_private_ipv4_in_any_spelling_is_refused(net, offset, form, scheme, port, path):
    ip = net[offset % net.num_addresses]
    url = f"{scheme}://{v4_forms(ip, form)}{port}{path}"
    with pytest.raises(netguard.Refused):
        netguard.check_url(url, frozenset())


@settings(max_examples=200, deadline=None)
@given(addr=st.sampled_from(["::1", "fe80::1", "fc00::1", "fd12:3456::1", "::", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1",
                             "64:ff9b::a00:1", "64:ff9b:1::a00:1", "2002:a00:1::1", "2001:db8::1", "::127.0.0.1"]), zone=st.sampled_from(["", "%25eth0"]))
def test_property_private_ipv6_is_refused(addr, zone):
    with pytest.raises(netguard.Refused):
        netguard.check_url(f"http://[{addr}{zone}]/x.jpg", frozenset())


def _numeric_only(host: str, port: int) -> list[str]:
    """The guard's resolver without DNS: numeric hosts resolve, names fail like a lookup would."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    return sorted({i[4][0] for i in infos})


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=st.one_of(st.text(max_size=80), st.builds(lambda s, h, r: f"{s}://{h}{r}", st.sampled_from(["http", "https", "ftp", "file", "", "javascript"]),
                                                       st.text(max_size=30), st.text(max_size=30))))
def test_property_check_url_only_refuses_with_a_reason(monkeypatch, url):
    """Any string: allowed, or Refused / OSError (unresolvable: a transient failure) with a
    one-line reason; never another exception."""
    monkeypatch.setattr(netguard, "resolve", _numeric_only)
    try:
        netguard.check_url(url, frozenset())
    except (netguard.Refused, OSError) as exc:
        assert str(exc) and "\n" not in str(exc)


def test_guard_refuses_a_private_peer_reached_by_a_public_looking_name(make_ctx):
    """127.0.0.2 is not on the allow-list: the connected-peer check refuses it even when the
    URL check is bypassed (DNS rebinding)."""
    from pipeline.ingest.images import Downloader, ImageProblem
    from pipeline.settings import NetworkConfig

    with CountingServer("127.0.0.2") as target:
        d = Downloader(NetworkConfig(allowed_private_hosts=(), deadline_s=2.0))
        original = netguard.check_url
        try:
            netguard.check_url = lambda url, allowed: None  # type: ignore[assignment]
            with pytest.raises(ImageProblem, match="non-public") as err:
                d.get(f"http://127.0.0.2:{target.port}/x.jpg")
        finally:
            netguard.check_url = original  # type: ignore[assignment]
        assert err.value.status == "quarantined" and target.hits == []
