"""One send to a real HTTP server on 127.0.0.1: bounded in bytes and in time, errors short and
free of secrets; retries with backoff within the round's time budget."""

from __future__ import annotations

import time

import pytest

from pipeline.alerts.config import AlertsConfig, Destination
from pipeline.alerts.transport import DeliveryError, Outgoing, PlainTransport, deliver, post_json
from tests.support.servers import HttpSink, free_port

OUT = Outgoing(alert_id="r|2026-10-15|Acme|*|*|any", subject="s", text="t", slack={"text": "t"},
               webhook={"schema": "brandmon.alert/1"})
SECRET = "pathS3cretT0ken99"


def test_a_huge_answer_is_read_only_up_to_the_byte_bound():
    with HttpSink() as sink:
        sink.mode = "huge"
        t0 = time.monotonic()
        post_json(sink.url("/x"), {"a": 1}, timeout_s=5, max_bytes=65536)  # 200: delivered
        assert time.monotonic() - t0 < 3


def test_an_answer_that_drips_is_cut_at_the_time_bound():
    with HttpSink() as sink:
        sink.mode, sink.delay_s = "drip", 4.0
        t0 = time.monotonic()
        with pytest.raises(DeliveryError, match="answer not complete within 1 s"):
            post_json(sink.url("/x"), {"a": 1}, timeout_s=1, max_bytes=65536)
        assert time.monotonic() - t0 < 2


def test_retries_back_off_within_the_time_budget_and_errors_hold_no_secret(monkeypatch):
    monkeypatch.setenv("DEAD_URL", f"http://127.0.0.1:{free_port()}/hooks/{SECRET}?key={SECRET}")
    dest = Destination(name="dead", kind="webhook", url_env="DEAD_URL")
    waits: list[float] = []
    cfg = AlertsConfig(retries=4, backoff_s=0.5, max_total_s=10, timeout_s=1)
    result = deliver(PlainTransport(), dest, OUT, cfg, sleep=waits.append)
    assert not result.ok and result.requests == 4 and waits == [0.5, 1.0, 2.0]
    assert result.error == "cannot connect: connection refused (after 4 request(s))"
    # the budget ends a round early: no wait that would cross max_total_s
    tight = AlertsConfig(retries=10, backoff_s=0.5, max_total_s=1.2, timeout_s=1)
    waits.clear()
    r = deliver(PlainTransport(), dest, OUT, tight, sleep=lambda s: (waits.append(s), time.sleep(s)))
    assert r.requests == 2 and waits == [0.5]


def test_an_error_echoing_the_url_is_scrubbed(monkeypatch):
    with HttpSink() as sink:
        monkeypatch.setenv("HOOK_URL", sink.url(f"/hooks/{SECRET}"))
        sink.mode, sink.state.status = "error", 503

        class Echo(PlainTransport):
            def send_once(self, dest, out, cfg, timeout_s):
                raise DeliveryError(f"HTTP 503: bad hook {self.url(dest)}")

        dest = Destination(name="h", kind="webhook", url_env="HOOK_URL")
        r = deliver(Echo(), dest, OUT, AlertsConfig(retries=1))
        assert SECRET not in r.error and "HTTP 503: bad hook ***" in r.error
        r = deliver(PlainTransport(), dest, OUT, AlertsConfig(retries=1))
        assert r.error == "HTTP 503: internal error (after 1 request(s))"
