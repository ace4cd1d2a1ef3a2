"""pipeline.airflow_api against a real HTTP server on 127.0.0.1 that answers as Airflow 3's
api-server does (token, asset lookup, event); the real api-server is in
tests/dags/test_dags_stack.py."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeline.airflow_api import AirflowApiError, emit_asset_event
from tests.support.services import free_port

PASSWORD = "pw-9d8c7b"
TOKEN = "jwt-token-abc"


class FakeAirflow(BaseHTTPRequestHandler):
    events: list[dict[str, Any]] = []

    def log_message(self, *_args: Any) -> None:
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/auth/token":
            body = self._body()
            if body == {"username": "admin", "password": PASSWORD}:
                return self._send(201, {"access_token": TOKEN})
            return self._send(401, {"detail": "Invalid credentials"})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"detail": "Not authenticated"})
        if self.path == "/api/v2/assets/events":
            body = self._body()
            self.events.append(body)
            return self._send(200, {"id": len(self.events), "asset_id": body["asset_id"], "extra": body["extra"]})
        return self._send(404, {"detail": "Not Found"})

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"detail": "Not authenticated"})
        if self.path.startswith("/api/v2/assets?"):
            return self._send(200, {"assets": [{"id": 3, "name": "brandmon://model-old", "uri": "brandmon://model-old/"},
                                               {"id": 7, "name": "brandmon://model", "uri": "brandmon://model/"}],
                                    "total_entries": 2})
        return self._send(404, {"detail": "Not Found"})


@pytest.fixture
def api() -> Iterator[str]:
    FakeAirflow.events = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAirflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_the_event_goes_to_the_asset_with_exactly_that_uri(api):
    event = emit_asset_event(api, "admin", PASSWORD, "brandmon://model", {"version": "v3"})
    assert event["id"] == 1
    assert FakeAirflow.events == [{"asset_id": 7, "extra": {"version": "v3"}}]


def test_bad_credentials_and_no_server_are_one_line_without_secrets(api):
    with pytest.raises(AirflowApiError) as err:
        emit_asset_event(api, "admin", "wrong-secret-1", "brandmon://model", {})
    assert "401" in str(err.value) and "BRANDMON_AIRFLOW_PASSWORD" in str(err.value)
    assert "wrong-secret-1" not in str(err.value)
    with pytest.raises(AirflowApiError, match="start the api-server or fix BRANDMON_AIRFLOW_API_URL"):
        emit_asset_event(f"http://127.0.0.1:{free_port()}", "admin", PASSWORD, "brandmon://model", {})
    with pytest.raises(AirflowApiError, match="not an http"):
        emit_asset_event("ftp://x", "admin", PASSWORD, "brandmon://model", {})
    with pytest.raises(AirflowApiError, match="knows no asset brandmon://nope"):
        emit_asset_event(api, "admin", PASSWORD, "brandmon://nope", {})
    assert FakeAirflow.events == []


def test_model_activate_emits_the_event_when_an_api_is_configured(api, make_ctx, monkeypatch, capsys):
    """`brandmon model activate V` on the command line: activation, then the model event."""
    from pipeline import schema
    from pipeline.cli import main

    ctx = make_ctx()
    with ctx.engine.begin() as conn:  # a registered version (what training writes), not active
        conn.execute(schema.model_versions.insert().values(
            version="v1", active=False, artifact_key="models/v1", classes=["A", "no_logo"], base="inception_v3",
            weights="none", input_size=75, threshold=0.5, metrics={}, data_fingerprint="f" * 64))
    s = ctx.settings
    for key, value in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                       "BRANDMON_HOME": str(s.home), "BRANDMON_AUTHOR_SALT": s.author_salt.get(),
                       "BRANDMON_AIRFLOW_API_URL": api, "BRANDMON_AIRFLOW_USER": "admin",
                       "BRANDMON_AIRFLOW_PASSWORD": PASSWORD}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BRANDMON_CONFIG", raising=False)
    assert main(["model", "activate", "v1"]) == 0
    out = capsys.readouterr().out
    assert "model v1 is now active" in out and "brandmon://model event 1 sent to Airflow" in out
    assert FakeAirflow.events == [{"asset_id": 7, "extra": {"version": "v1", "source": "brandmon model activate"}}]
    monkeypatch.setenv("BRANDMON_AIRFLOW_PASSWORD", "wrong")
    assert main(["model", "activate", "v1"]) == 2
    err = capsys.readouterr().err
    assert "model v1 is active, but the brandmon://model event was not sent" in err
    assert "airflow dags trigger brandmon_detect" in err
    monkeypatch.delenv("BRANDMON_AIRFLOW_API_URL")
    assert main(["model", "activate", "v1"]) == 0
    assert "airflow dags trigger brandmon_detect" in capsys.readouterr().out


def _trickle_server(head: bytes) -> tuple[int, threading.Event]:
    """A real server on 127.0.0.1 that sends `head` and then one byte every 0.3 s, forever
    (a hung proxy or a broken api-server): each read succeeds, so a socket timeout never fires."""
    import socket

    stop = threading.Event()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        conns = []
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                conn.sendall(head)
                conns.append(conn)
            except OSError:
                pass
            for c in conns:
                with contextlib.suppress(OSError):
                    c.sendall(b" ")
            stop.wait(0.3)
        for c in conns:
            c.close()
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1], stop


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{",  # a body that never ends
        b"HTTP/1.1 200 OK\r\nX-Slow: ",  # headers that never end
    ],
    ids=["body", "headers"],
)
def test_a_server_that_trickles_bytes_cannot_hold_model_activate_past_the_deadline(monkeypatch, head):
    import time

    from pipeline import airflow_api

    monkeypatch.setattr(airflow_api, "TIMEOUT_S", 2.0)
    port, stop = _trickle_server(head)
    t0 = time.monotonic()
    try:
        with pytest.raises(AirflowApiError) as err:
            emit_asset_event(f"http://127.0.0.1:{port}", "admin", PASSWORD, "brandmon://model", {})
    finally:
        stop.set()
    elapsed = time.monotonic() - t0
    assert elapsed < 6, elapsed
    message = str(err.value)
    assert "no complete answer within 2s" in message and "POST /auth/token" in message, message
    assert PASSWORD not in message and "\n" not in message


def test_a_redirect_never_carries_the_token_to_another_server(api):
    """The api-server answers these calls directly; urllib would follow a redirect of the
    asset lookup with the `Authorization: Bearer` header to whatever host it names."""
    seen: list[str] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization") or "")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=other.serve_forever, daemon=True).start()

    class Redirecting(FakeAirflow):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(AirflowApiError) as err:
            emit_asset_event(f"http://127.0.0.1:{server.server_address[1]}", "admin", PASSWORD, "brandmon://model", {})
    finally:
        server.shutdown()
        other.shutdown()
    assert seen == []  # the token never left for the other server
    assert "answered 302" in str(err.value) and TOKEN not in str(err.value)
