"""Total deadlines and decoded-size caps (`pipeline.ingest.bounded`) for feed requests and image
downloads, against real misbehaving servers on 127.0.0.1 (`tests.support.feeds.HostileServer`)."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import pytest
from ingest_helpers import jpeg

from pipeline.ingest.http import FeedError, HttpClient
from pipeline.ingest.images import Downloader, ImageProblem
from pipeline.settings import NetworkConfig
from tests.support.feeds import (
    HostileServer,
    chunked_forever,
    drip_body,
    drip_headers,
    gzip_bomb,
    redirect,
    send,
)

pytestmark = pytest.mark.timeout(60)  # a regression must fail, not hang

MB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def hostile():
    with HostileServer() as s:
        yield s


def net(**kw) -> NetworkConfig:
    base = {"max_retries": 0, "timeout_s": 5.0, "deadline_s": 1.0, "max_response_bytes": MB, "max_image_bytes": MB,
            "allowed_private_hosts": ("127.0.0.1",)}
    return NetworkConfig(**{**base, **kw})


def client(**kw) -> HttpClient:
    return HttpClient(net(**kw), backoff_s=0.01, sleep=lambda _s: None)


def timed(fn):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    try:
        fn()
    finally:
        elapsed = time.monotonic() - t0
    return elapsed


# --- feeds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [drip_headers(0.05), drip_body(b'{"a": ' + b"1" * 500 + b"}", 0.05, JSON)],
                         ids=["drip-headers", "drip-body"])
def test_feed_request_has_a_total_deadline_even_when_bytes_keep_coming(hostile, behaviour):
    """Bytes every 50 ms never trip the 5 s read timeout; the 1 s total deadline must."""
    url = hostile.add("/feed", behaviour)
    with pytest.raises(FeedError, match=r"exceeded the 1 s deadline for the whole request after 2 attempts"):
        t = time.monotonic()
        try:
            client(max_retries=1).get_json(url)
        finally:
            assert time.monotonic() - t < 2 * 1.0 + 1.0
    assert hostile.hits["/feed"] == 2  # a deadline is retried like a timeout


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_feed_compression_bomb_stops_at_the_decoded_cap_in_bounded_memory(hostile, encoding):
    if encoding == "raw-deflate":
        obj = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = obj.compress(b"\0" * (64 * MB)) + obj.flush()
        header = "deflate"
    else:
        body, header = gzip_bomb(64 * MB, encoding), encoding
    url = hostile.add("/bomb", send(body, {**JSON, "Content-Encoding": header}))
    tracemalloc.start()
    try:
        with pytest.raises(FeedError, match=rf"response refused: more than {MB} bytes once decoded"):
            client().get_json(url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * MB, f"peak {peak / MB:.1f} MiB while refusing a 64 MiB bomb"
    assert hostile.hits["/bomb"] == 1  # not retried: it would be the same next time


def test_feed_content_length_lie_and_endless_chunks_are_refused(hostile):
    lie = hostile.add("/lie", send(b"[]", JSON, length=50 * 1024**3))
    with pytest.raises(FeedError, match="Content-Length 53687091200 is over the cap"):
        client().get_json(lie)
    endless = hostile.add("/endless", chunked_forever())
    with pytest.raises(FeedError, match=f"more than {MB} bytes"):
        client().get_json(endless)


def test_feed_lying_short_content_length_then_silence_is_bounded(hostile):
    url = hostile.add("/short", send(b'{"a"', JSON, length=1000, then_hold=True))
    elapsed = timed(lambda: pytest.raises(FeedError, client(timeout_s=30).get_json, url))
    assert elapsed < 2.0


def test_feed_unknown_encoding_is_refused_and_good_gzip_is_read(hostile):
    br = hostile.add("/br", send(b"\x0b\x02\x80[]\x03", {**JSON, "Content-Encoding": "br"}))
    with pytest.raises(FeedError, match="unsupported Content-Encoding 'br'"):
        client().get_json(br)
    doc = {"statuses": list(range(1000))}
    two_members = gzip.compress(json.dumps(doc).encode()[:100]) + gzip.compress(json.dumps(doc).encode()[100:])
    ok = hostile.add("/ok", send(two_members, {**JSON, "Content-Encoding": "gzip"}))
    body, resp = client().get_json(ok)
    assert body == doc and resp.json() == doc
    assert client().session.headers["Accept-Encoding"] == "gzip, deflate"


def test_feed_truncated_gzip_is_retried_then_fails_with_the_reason(hostile):
    url = hostile.add("/cut", send(gzip.compress(b"[1, 2, 3]" * 1000)[:-20], {**JSON, "Content-Encoding": "gzip"}))
    with pytest.raises(FeedError, match="truncated gzip body after 3 attempts"):
        client(max_retries=2).get_json(url)
    assert hostile.hits["/cut"] == 3


def test_feed_json_nested_100k_deep_under_gzip_fails_with_one_line(hostile):
    body = gzip.compress(b"[" * 100_000 + b"]" * 100_000)
    url = hostile.add("/deep", send(body, {**JSON, "Content-Encoding": "gzip"}))
    with pytest.raises(FeedError, match="JSON nested too deeply"):
        client(max_retries=3).get_json(url)
    assert hostile.hits["/deep"] == 1


def test_post_token_request_is_bounded_too(hostile):
    url = hostile.add("/token", drip_headers(0.05))
    t = time.monotonic()
    with pytest.raises(FeedError, match="deadline"):
        client().request_json("POST", url, data={"grant_type": "client_credentials"})
    assert time.monotonic() - t < 2.0


# --- images -----------------------------------------------------------------------------------------


def dl(**kw) -> Downloader:
    return Downloader(net(**kw))


@pytest.mark.parametrize("behaviour", [drip_headers(0.05), drip_body(jpeg(), 0.01, {"Content-Type": "image/jpeg"}),
                                       redirect("/x", delay_s=0.6)],
                         ids=["drip-headers", "drip-body", "slow-redirects"])
def test_image_download_has_a_total_deadline(hostile, behaviour):
    url = hostile.add("/x", behaviour)
    t = time.monotonic()
    with pytest.raises(ImageProblem, match=r"exceeded the 1 s deadline") as err:
        dl().get(url)
    assert time.monotonic() - t < 2.0
    assert err.value.status == "failed"


def test_image_gzip_bomb_and_lies_are_quarantined(hostile):
    bomb = hostile.add("/bomb.jpg", send(gzip_bomb(64 * MB), {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}))
    with pytest.raises(ImageProblem, match=f"too large: more than {MB} bytes once decoded") as err:
        dl().get(bomb)
    assert err.value.status == "quarantined"
    lie = hostile.add("/lie.jpg", send(jpeg(), {"Content-Type": "image/jpeg"}, length=10**12))
    with pytest.raises(ImageProblem, match="too large: Content-Length") as err:
        dl().get(lie)
    assert err.value.status == "quarantined"
    endless = hostile.add("/endless.jpg", chunked_forever())
    with pytest.raises(ImageProblem, match="too large") as err:
        dl().get(endless)
    assert err.value.status == "quarantined"


def test_image_gzip_encoded_is_decoded_and_redirect_loop_is_quarantined(hostile):
    data = jpeg()
    url = hostile.add("/z.jpg", send(gzip.compress(data), {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}))
    assert dl().get(url) == data
    loop = hostile.add("/loop", redirect("/loop"))
    with pytest.raises(ImageProblem, match="more than 5 redirects") as err:
        dl().get(loop)
    assert err.value.status == "quarantined"
