"""Image safety: the private-address guard, sniffing, Pillow checks, byte caps, redirects."""

from __future__ import annotations

import pytest
import requests
from ingest_helpers import gif, jpeg, noisy_jpeg, png, png_header_only, truncated_jpeg, webp

from pipeline.ingest import netguard
from pipeline.ingest.images import Downloader, ImageProblem, inspect_image, sniff, storage_key
from pipeline.settings import NetworkConfig
from tests.support.feeds import FakeServer

LOCAL = netguard.allowed_set(["127.0.0.1"])


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.100.100.200", False), ("100.64.0.1", False), ("0.0.0.0", False),
        ("::1", False), ("fd00:ec2::254", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False), ("not-an-ip", False),
    ],
)
def test_public_address_classification(address, public):
    assert netguard.is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/x.jpg", "non-public"),
        ("http://localhost:8080/x.jpg", "non-public"),
        ("http://169.254.169.254/latest/meta-data/", "non-public"),
        ("http://[::1]/x", "non-public"),
        ("http://10.0.0.5/x", "non-public"),
        ("http://2130706433/x", "non-public"),  # 127.0.0.1 as an integer
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("synthetic://images/x.jpg", "scheme"),
        ("http://user:pw@example.com/x", "credentials"),
        ("http:///nohost", "no host"),
    ],
)
def test_check_url_refuses(url, why):
    with pytest.raises(netguard.Refused, match=why):
        netguard.check_url(url, frozenset())


def test_check_url_allows_listed_private_host():
    netguard.check_url("http://127.0.0.1:9/x.jpg", LOCAL)


def test_guarded_adapter_checks_the_connected_peer():
    """Even when the pre-check is bypassed (DNS rebinding), the socket's peer is checked."""
    with FakeServer() as srv:
        srv.add_bytes("/a.jpg", jpeg())
        s = requests.Session()
        s.trust_env = False
        s.mount("http://", netguard.GuardedAdapter(frozenset()))
        with pytest.raises(netguard.Refused, match="connected to a non-public address"):
            s.get(srv.url + "/a.jpg", timeout=5)
        s.mount("http://", netguard.GuardedAdapter(LOCAL))
        assert s.get(srv.url + "/a.jpg", timeout=5).content == jpeg()


@pytest.mark.parametrize(("data", "mime"), [(jpeg(), "image/jpeg"), (png(), "image/png"), (gif(), "image/gif"), (webp(), "image/webp")])
def test_inspect_accepts_the_four_formats(data, mime):
    info = inspect_image(data)
    assert info.mime == mime and sniff(data) == mime
    assert info.width > 0 and info.height > 0 and info.size == len(data)
    assert storage_key(info.sha256) == f"images/sha256/{info.sha256[:2]}/{info.sha256[2:4]}/{info.sha256}"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>not found</body></html>", "HTML"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (b"\xff\xd8\xff" + b"\x00" * 50, "corrupt JPEG"),
        (truncated_jpeg(), "corrupt JPEG"),
        (png_header_only(50_000, 50_000), "decompression bomb|too large"),
        (png_header_only(9_000, 9_000), "too large: 9000x9000"),
        (b"GIF89a" + b"\x01" * 20, "corrupt GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "corrupt WEBP"),
    ],
)
def test_inspect_quarantines_bad_images(data, reason):
    with pytest.raises(ImageProblem, match=reason) as err:
        inspect_image(data)
    assert err.value.status == "quarantined"


@pytest.fixture
def srv():
    with FakeServer() as s:
        s.add_bytes("/good.jpg", jpeg())
        s.add_bytes("/big.jpg", noisy_jpeg(256, 256))
        s.add_bytes("/missing.jpg", b"nope", "text/plain", status=404)
        s.add_redirect("/hop.jpg", "/good.jpg")
        s.add_redirect("/loop.jpg", "/loop.jpg")
        s.add_redirect("/to-metadata.jpg", "http://169.254.169.254/latest/meta-data/iam")
        yield s


def dl(allowed=("127.0.0.1",), **kw) -> Downloader:
    return Downloader(NetworkConfig(allowed_private_hosts=tuple(allowed), timeout_s=kw.pop("timeout_s", 5), **kw))


def test_download_and_redirect(srv):
    d = dl()
    assert d.get(srv.url + "/good.jpg") == jpeg()
    assert d.get(srv.url + "/hop.jpg") == jpeg()


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/missing.jpg", "failed", "HTTP 404"),
        ("/loop.jpg", "quarantined", "redirects"),
        ("/to-metadata.jpg", "quarantined", "non-public"),
    ],
)
def test_download_problems(srv, path, status, reason):
    with pytest.raises(ImageProblem, match=reason) as err:
        dl().get(srv.url + path)
    assert err.value.status == status


def test_byte_cap(srv):
    with pytest.raises(ImageProblem, match="too large") as err:
        dl(max_image_bytes=10_000).get(srv.url + "/big.jpg")
    assert err.value.status == "quarantined"


def test_private_host_refused_without_allow_list_also_via_redirect(srv):
    d = dl(allowed=())
    with pytest.raises(ImageProblem, match="refused") as err:
        d.get(srv.url + "/good.jpg")
    assert err.value.status == "quarantined"
    assert srv.hits("/good.jpg") == 0
    with FakeServer() as public_looking:
        # The first hop is allowed by name ("localhost" listed), the redirect target is not.
        public_looking.add_redirect("/r.jpg", srv.url + "/good.jpg")
        d2 = dl(allowed=("localhost",))
        with pytest.raises(ImageProblem, match="refused: host '127.0.0.1'"):
            d2.get(f"http://localhost:{public_looking.port}/r.jpg")
        assert public_looking.hits("/r.jpg") == 1
    assert srv.hits("/good.jpg") == 0


def test_slow_image_times_out(srv):
    srv.fault("/good.jpg", "slow", delay_s=2, times=1)
    with pytest.raises(ImageProblem, match="timed out") as err:
        dl(timeout_s=0.3).get(srv.url + "/good.jpg")
    assert err.value.status == "failed"


class ConnectionMeter:
    """A route handler that serves an image slowly and records, per Host header, how many
    requests (each on its own pooled connection) were in flight at once."""

    def __init__(self, data: bytes, delay_s: float = 0.15) -> None:
        import threading

        self.data, self.delay_s = data, delay_s
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self._lock = threading.Lock()

    def __call__(self, req, **_groups):
        import time

        from tests.support.feeds import Response

        host = req.headers.get("host", "").rsplit(":", 1)[0]
        with self._lock:
            self.active[host] = self.active.get(host, 0) + 1
            self.peak[host] = max(self.peak.get(host, 0), self.active[host])
            self.peak_total = max(self.peak_total, sum(self.active.values()))
        time.sleep(self.delay_s)
        with self._lock:
            self.active[host] -= 1
        return Response(200, self.data, {"Content-Type": "image/jpeg"})


def test_per_host_connection_limit(make_ctx):
    """image_workers=8 but per_host_connections=2: never more than 2 downloads at once from
    one host, while two hosts (127.0.0.1 and localhost) are served in parallel."""
    import datetime as dt

    from ingest_helpers import config

    from pipeline.ingest.jobs import ingest_window
    from tests.support.feeds import FakeMastodon, mastodon_media, mastodon_status

    day = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
    meter = ConnectionMeter(jpeg())
    with FakeMastodon() as masto:
        masto.route("GET", r"/img/\d+\.jpg", meter)
        hosts = [masto.url, f"http://localhost:{masto.port}"]
        masto.statuses = [
            mastodon_status(day + dt.timedelta(minutes=10 * i), f"#acme {i}", seq=i, tags=("acme",),
                            media=[mastodon_media(f"{hosts[i % 2]}/img/{i}.jpg")])
            for i in range(24)
        ]
        cfg = config([{"name": "masto", "kind": "mastodon", "base_url": masto.url, "hashtags": ["acme"]}],
                     image_workers=8, per_host_connections=2)
        cfg["network"]["allowed_private_hosts"] = ["127.0.0.1", "localhost"]
        ctx = make_ctx(cfg)
        counts = ingest_window(ctx, "masto", day, day + dt.timedelta(days=1))
    assert counts["images_stored"] == 24
    assert meter.peak == {"127.0.0.1": 2, "localhost": 2}
    assert meter.peak_total == 4
