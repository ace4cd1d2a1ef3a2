"""Mastodon-API servers whose ids are not Mastodon snowflakes (GoToSocial ULIDs, Akkoma/Pleroma
flake ids, pre-2.0 integers, mixtures): the default options must read every status of the
window, and say which walk they used. Plus properties of the id-mode detection and the Link
header parser."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.settings import NetworkConfig, Settings, SourceConfig
from pipeline.sources.mastodon.connector import is_snowflake, next_max_id, parse_link_header
from pipeline.sources.registry import make_connector
from tests.support.feeds import FakeMastodon, mastodon_status, snowflake, status_id

DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
END = DAY + dt.timedelta(days=1)
TAG = "/api/v1/timelines/tag/acme"


def connector(url: str, **options):
    s = Settings(database_url="sqlite://", storage_url="/tmp/x", network=NetworkConfig(max_retries=1, timeout_s=5))
    src = SourceConfig(name="src", kind="mastodon", options={"base_url": url, "hashtags": ["acme"], "limit": 7, "backoff_s": 0.01, **options})
    return make_connector(s, src, sleep=lambda _s: None)


def fetched_ids(conn, start=DAY, end=END) -> list[str]:
    return [r["id"] for p in conn.pages(start, end) for r in (p.records or [])]


def statuses(scheme: str, n: int = 60, first: dt.datetime = DAY - dt.timedelta(days=1), step_min: int = 70) -> list[dict]:
    out = []
    for i in range(n):
        when = first + dt.timedelta(minutes=step_min * i)
        out.append(mastodon_status(when, f"acme {i}", seq=i, tags=("acme",), sid=status_id(scheme, when, i)))
    return out


def in_window(items: list[dict], start=DAY, end=END) -> set[str]:
    return {s["id"] for s in items if start.isoformat()[:19] <= s["created_at"][:19] < end.isoformat()[:19]}


@pytest.mark.parametrize("scheme,mode", [("ulid", "time"), ("flake", "time"), ("serial", "time"), ("snowflake", "snowflake")])
def test_default_options_read_every_server_id_scheme(scheme, mode):
    items = statuses(scheme)
    want = in_window(items)
    assert len(want) > 15
    with FakeMastodon(items, max_limit=7) as srv:
        c = connector(srv.url)
        got = fetched_ids(c)
        assert want <= set(got), f"{scheme}: lost {sorted(want - set(got))[:3]}"
        assert c.modes == {"tag:acme": mode}
        if mode == "time":  # by time: never a since_id, max_id only from the server's Link headers
            assert all("since_id" not in r.query for r in srv.requests[2:])
            links = [r.query["max_id"] for r in srv.requests[3:]]
            assert all(m in {s["id"] for s in items} for m in links)


def test_trusted_snowflake_mode_on_a_ulid_server_reads_nothing():
    """What the issue found (today's behaviour kept only when asked for): the id range in
    snowflake terms selects nothing on GoToSocial."""
    items = statuses("ulid")
    with FakeMastodon(items, max_limit=7) as srv:
        assert fetched_ids(connector(srv.url, id_mode="snowflake")) == []
        assert fetched_ids(connector(srv.url, snowflake_ids=True)) != []  # the old default spelling now means auto


def test_mixed_server_pre_2_0_integers_then_snowflakes():
    """An instance upgraded to Mastodon 2.0 at noon of DAY: the morning's statuses keep small
    integer ids, below every snowflake; the window must get both."""
    upgrade = DAY + dt.timedelta(hours=12)
    items = []
    for i in range(60):
        when = DAY - dt.timedelta(days=1) + dt.timedelta(minutes=70 * i)
        sid = str(1000 + i) if when < upgrade else snowflake(when, i)
        items.append(mastodon_status(when, f"acme {i}", seq=i, tags=("acme",), sid=sid))
    with FakeMastodon(items, max_limit=7) as srv:
        for start, end in [(DAY, END), (DAY, upgrade), (DAY - dt.timedelta(days=1), DAY)]:
            c = connector(srv.url)
            got = set(fetched_ids(c, start, end))
            assert in_window(items, start, end) <= got, (start, end)
        # The whole window is pre-upgrade: the id range is empty, the newest page is snowflakes,
        # and only the tail check finds the window's integer ids.
        c = connector(srv.url)
        assert in_window(items, DAY - dt.timedelta(days=1), DAY) <= set(fetched_ids(c, DAY - dt.timedelta(days=1), DAY))
        assert c.modes == {"tag:acme": "time"}


def test_fake_server_pages_string_ids_with_link_headers():
    import requests

    items = statuses("ulid", n=20)
    ids = sorted((s["id"] for s in items), reverse=True)
    with FakeMastodon(items, max_limit=5) as srv:
        url = srv.url + TAG
        page = requests.get(url, params={"limit": 5}, timeout=5)
        assert [s["id"] for s in page.json()] == ids[:5]
        nxt = next_max_id(page.headers["Link"])
        assert nxt == ids[4]
        page = requests.get(url, params={"limit": 5, "max_id": nxt, "since_id": ids[8]}, timeout=5)
        assert [s["id"] for s in page.json()] == ids[5:8]
        page = requests.get(url, params={"limit": 5, "min_id": ids[10]}, timeout=5)
        assert [s["id"] for s in page.json()] == ids[5:10]


def test_empty_stream_and_genuinely_empty_snowflake_window():
    with FakeMastodon([], max_limit=7) as srv:
        c = connector(srv.url)
        assert fetched_ids(c) == [] and c.modes == {"tag:acme": "empty"}
    items = statuses("snowflake", first=END + dt.timedelta(hours=1))  # all after the window
    with FakeMastodon(items, max_limit=7) as srv:
        c = connector(srv.url)
        assert fetched_ids(c) == [] and c.modes == {"tag:acme": "snowflake"}
        assert srv.hits(TAG) == 3  # the id range, the newest page, the tail check


# --- properties -----------------------------------------------------------------------------------

SCHEMES = ["snowflake", "ulid", "flake", "serial", "mixed"]


@st.composite
def servers(draw):  # type: ignore[no-untyped-def]
    """A server's statuses: ids of one scheme (or pre-2.0 integers, then snowflakes), times over
    three days; a snowflake may be stamped up to 5 minutes before its created_at (remote
    statuses whose clock runs ahead), within the connector's 10-minute slack."""
    scheme = draw(st.sampled_from(SCHEMES))
    minutes = draw(st.lists(st.integers(0, 3 * 24 * 60), min_size=0, max_size=40, unique=True))
    cut = DAY - dt.timedelta(days=1) + dt.timedelta(minutes=draw(st.integers(0, 3 * 24 * 60)))
    items = []
    for rank, m in enumerate(sorted(minutes)):
        when = DAY - dt.timedelta(days=1) + dt.timedelta(minutes=m, seconds=draw(st.integers(0, 59)))
        kind = ("serial" if when < cut else "snowflake") if scheme == "mixed" else scheme
        if kind == "snowflake":
            sid = snowflake(when - dt.timedelta(seconds=draw(st.integers(0, 300))), rank)
        else:
            sid = status_id(kind, when, rank)
        items.append(mastodon_status(when, f"acme {rank}", seq=rank, tags=("acme",), sid=sid))
    return scheme, items


@pytest.fixture(scope="module")
def shared_server():
    with FakeMastodon([], max_limit=6) as srv:
        yield srv


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(server=servers(), limit=st.integers(1, 6))
def test_property_no_in_window_status_is_lost_whatever_the_id_scheme(shared_server, server, limit):
    scheme, items = server
    shared_server.statuses = items
    c = connector(shared_server.url, limit=limit)
    got = fetched_ids(c)
    want = in_window(items)
    assert want <= set(got), f"{scheme}: lost {len(want - set(got))} of {len(want)}"
    if scheme == "snowflake" and want:
        assert c.modes["tag:acme"] == "snowflake"  # the fast walk where it is safe
    if scheme in ("ulid", "flake") and items:
        assert c.modes["tag:acme"] == "time"


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40)))
def test_property_is_snowflake_never_raises(status):
    assert is_snowflake(status) in (True, False)


@given(st.integers(0, 2**40), st.integers(0, 0xFFFF), st.integers(-120, 600))
def test_property_snowflakes_of_their_own_time_are_recognised(ms, seq, lag_s):
    when = dt.datetime(2017, 4, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms % (10 * 365 * 86400 * 1000))
    status = {"id": str((int(when.timestamp() * 1000) - lag_s * 1000) << 16 | seq), "created_at": when.isoformat()}
    assert is_snowflake(status) == (-60 <= lag_s <= 600)


URLS = st.from_regex(r"https://[a-z]{1,8}\.example/api/v1/timelines/tag/[a-z]{1,6}\?limit=[0-9]{1,2}&max_id=[0-9A-Za-z]{1,26}", fullmatch=True)
RELS = st.sampled_from(["next", "prev", "NEXT", "next prev", "last"])


@given(st.lists(st.tuples(URLS, RELS, st.booleans(), st.sampled_from([", ", ",", " ,  "])), max_size=5))
def test_property_link_header_round_trip(links):
    """Quoted or bare rel values (a bare one cannot hold a space), any separators: each rel
    maps to the first URL carrying it, and `next_max_id` is the max_id of the next URL."""
    links = [(u, r, q or " " in r, sep) for u, r, q, sep in links]
    header = "".join(f'<{u}>; rel={chr(34) * q}{r}{chr(34) * q}{sep}' for u, r, q, sep in links)
    parsed = parse_link_header(header)
    want: dict[str, str] = {}
    for u, r, _q, _sep in links:
        for name in r.split():
            want.setdefault(name.lower(), u)
    assert parsed == want
    if "next" in want:
        assert next_max_id(header) == want["next"].rsplit("max_id=", 1)[1]


@given(st.text(max_size=300))
def test_property_link_header_parser_never_raises(text):
    parsed = parse_link_header(text)
    assert isinstance(parsed, dict) and all(isinstance(v, str) for v in parsed.values())
    assert next_max_id(text) is None or isinstance(next_max_id(text), str)
