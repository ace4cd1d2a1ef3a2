"""Real servers on 127.0.0.1 for tests that send things: an HTTP sink (webhook- or
Slack-shaped endpoint) whose behaviour can be switched to fail, and an SMTP sink (aiosmtpd).

Both record what they received, so a test can count messages; both run in a background
thread and stop on leaving the `with` block.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.support.services import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _State:
    # ok | error (HTTP 500) | slow (answers after `delay_s`) | slack-error (400 invalid_token) |
    # huge (200 with a 20 MB body) | drip (200, then one body byte every 0.2 s for `delay_s`) |
    # echo (403 whose body repeats the query values and the basic-auth password it was sent)
    mode: str = "ok"
    delay_s: float = 5.0
    ok_delay_s: float = 0.0  # "ok" mode: answer after this long (concurrency tests)
    status: int = 500
    received: list[Received] = field(default_factory=list)  # accepted (2xx) requests
    attempts: list[Received] = field(default_factory=list)  # every request, failed ones too
    lock: threading.Lock = field(default_factory=threading.Lock)


class HttpSink:
    """`with HttpSink() as sink:` POST to `sink.url("/hook")`; `sink.mode = "error"` makes it answer
    500, `"slow"` makes it answer only after `sink.delay_s`; `sink.received` lists accepted posts."""

    def __init__(self, port: int = 0) -> None:
        self.state = _State()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 20))
                rec = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with state.lock:
                    state.attempts.append(rec)
                    mode = state.mode
                if mode == "slow":
                    time.sleep(state.delay_s)
                if mode == "error":
                    self._answer(state.status, b"internal error")
                    return
                if mode == "echo":
                    query = urlsplit(self.path).query
                    said = [v for _, v in parse_qsl(query)]
                    auth = self.headers.get("Authorization") or ""
                    if auth.startswith("Basic "):
                        said.append(base64.b64decode(auth[6:]).decode().partition(":")[2])
                    self._answer(403, ("bad credentials: " + " ".join(said)).encode())
                    return
                if mode == "slack-error":
                    self._answer(400, b"invalid_token")
                    return
                if mode in ("huge", "drip"):
                    self._stream(mode)
                    return
                if mode == "ok":
                    if state.ok_delay_s:
                        time.sleep(state.ok_delay_s)
                    with state.lock:
                        state.received.append(rec)
                self._answer(200, b"ok")

            def _stream(self, mode: str) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    if mode == "huge":
                        self.send_header("Content-Length", str(20 << 20))
                        self.end_headers()
                        for _ in range(20 << 4):
                            self.wfile.write(b"x" * 65536)
                    else:
                        self.send_header("Content-Length", "1000")
                        self.end_headers()
                        deadline = time.monotonic() + state.delay_s
                        while time.monotonic() < deadline:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                except OSError:  # the client stopped reading: what the test wants
                    pass

            def _answer(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (a timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http-sink", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def mode(self) -> str:
        return self.state.mode

    @mode.setter
    def mode(self, value: str) -> None:
        with self.state.lock:
            self.state.mode = value

    @property
    def delay_s(self) -> float:
        return self.state.delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self.state.delay_s = value

    @property
    def received(self) -> list[Received]:
        with self.state.lock:
            return list(self.state.received)

    @property
    def attempts(self) -> list[Received]:
        with self.state.lock:
            return list(self.state.attempts)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def __enter__(self) -> HttpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class SmtpSink:
    """`with SmtpSink(users={"u": "pw"}) as smtp:` an aiosmtpd server on 127.0.0.1 (no TLS);
    with `users`, it offers AUTH LOGIN/PLAIN without TLS and checks the password.
    `smtp.messages` are the parsed emails received."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self._messages: list[Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[str] = []
        lock = threading.Lock()
        self._lock = lock
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                with lock:
                    sink._messages.append(message_from_bytes(envelope.original_content or envelope.content, policy=policy.default))
                    sink.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                return "250 Message accepted for delivery"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            if not isinstance(auth_data, LoginPassword):
                return AuthResult(success=False, handled=False)
            user, pw = auth_data.login.decode(), auth_data.password.decode()
            ok = users is not None and users.get(user) == pw
            if ok:
                with lock:
                    sink.logins.append(user)
            return AuthResult(success=ok, handled=False)

        kwargs: dict[str, Any] = {}
        if users is not None:
            kwargs = {"authenticator": authenticator, "auth_require_tls": False, "auth_required": True}
        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()


class RawTcpServer:
    """`with RawTcpServer("drip") as srv:` a TCP server on 127.0.0.1 that misbehaves below any
    protocol: `drip` sends one byte every 0.2 s and never a line end, `silent` accepts and says
    nothing, `drop` closes each connection at once."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="raw-tcp", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.mode == "drop":
                    return
                while not self._stop.is_set():
                    if self.mode == "drip":
                        conn.sendall(b"2")
                    time.sleep(0.2)
            except OSError:  # the client hung up: what the test wants
                pass

    def __enter__(self) -> RawTcpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(timeout=5)
