"""Throwaway services for tests, benchmarks and CI: a Postgres cluster and an S3 API server.

Real services, not mocks: a private Postgres cluster (initdb + pg_ctl on 127.0.0.1, a free
port, durability off for speed) and `moto_server` speaking the S3 API; `S3FaultProxy` sits in
front of the latter to answer chosen requests with real S3 errors (reliability tests). Used by
tests/conftest.py, the bench/ scripts, and `.ci/run` via
`python -m tests.support.services up|down --dir DIR` from the repository root (which writes
DIR/env.sh to source).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

PG_ROOT = Path("/usr/lib/postgresql")


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    """A port nothing listens on (bound and released): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin_dirs(root: Path = PG_ROOT) -> list[Path]:
    """Debian's Postgres server folders (/usr/lib/postgresql/<version>/bin), newest version first."""
    def version(d: Path) -> tuple[int, ...]:
        parts = d.parent.name.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)

    return sorted((d for d in root.glob("*/bin") if d.is_dir()), key=version, reverse=True)


def _pg_bin(name: str) -> str:
    for d in pg_bin_dirs():
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise ServiceError(
            f"Postgres server binaries ({name}) not found; install them (apt-get install postgresql) "
            "or point BRANDMON_TEST_PG_URL at a server"
        )
    return found


def _as_pg_user(cmd: list[str]) -> list[str]:
    """Postgres refuses to run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PostgresCluster:
    """A private cluster in `base` on 127.0.0.1 only: trust auth, or passwords (scram) if `password`."""

    def __init__(self, base: Path | None = None, port: int | None = None, password: str | None = None) -> None:
        self.password = password
        # The postgres user must reach the folder: default to a fresh one directly under /tmp.
        self.owns_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="brandmon-pg-"))
        self.data = self.base / "data"
        self.port = port or free_port()
        self.log = self.base / "postgres.log"

    @property
    def url(self) -> str:
        auth = f"postgres:{quote(self.password, safe='')}" if self.password else "postgres"
        return f"postgresql+psycopg2://{auth}@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> PostgresCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            auth = ["--auth=trust"]
            pwfile = self.base / "pwfile"
            if self.password:  # TCP needs the password; the unix socket stays trusted for admin work
                pwfile.write_text(self.password + "\n")
                if os.geteuid() == 0:
                    shutil.chown(pwfile, "postgres", "postgres")
                auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
            init = subprocess.run(
                _as_pg_user([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", *auth, "-E", "UTF8", "--no-locale"]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            pwfile.unlink(missing_ok=True)
            if init.returncode != 0:
                raise ServiceError(f"initdb failed in {self.data}: {init.stdout.strip()[-1500:]}")
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            "-c shared_buffers=512MB -c work_mem=64MB -c maintenance_work_mem=512MB"
        )
        proc = subprocess.run(
            _as_pg_user([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", str(int(timeout)), "start"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else proc.stdout
            raise ServiceError(f"Postgres did not start on 127.0.0.1:{self.port}:\n{tail}")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                _as_pg_user([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)


class MotoServer:
    """`moto_server` on 127.0.0.1 in its own process group."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> MotoServer:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(exe).exists():
            raise ServiceError("moto_server not found; install the test extras (pip install -e .[test])")
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"moto_server exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).read()  # noqa: S310 - loopback
                return self
            except OSError:
                time.sleep(0.2)
        raise ServiceError(f"moto_server did not answer on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


# --- an S3 fault proxy ---------------------------------------------------------------------------

S3_ERRORS = {  # code -> (HTTP status, message), as S3 itself answers them
    "SlowDown": (503, "Please reduce your request rate."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "AccessDenied": (403, "Access Denied"),
    "InvalidAccessKeyId": (403, "The AWS Access Key Id you provided does not exist in our records."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided. "
                                   "Check your key and signing method."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


@dataclass
class S3Fault:
    """One rule of an `S3FaultProxy`: which requests, what happens, how often.

    `kind`: "error" answers with the S3 XML error `code`; "drop" closes the connection without an
    answer; "truncate" forwards the request but sends only half of the answer's body; "action"
    calls `action()` then forwards. The rule lets `skip` matching requests through, then fires
    `times` times; with `paths` set, it picks the first `paths` distinct objects and fails every
    request for them (a persistent per-object fault that boto3's retries cannot get past).
    """

    method: str
    pattern: str
    kind: str = "error"
    code: str = "SlowDown"
    times: int = 1
    skip: int = 0
    paths: int | None = None
    action: Callable[[], None] | None = None
    hits: int = 0
    fired: int = 0
    chosen: set[str] = field(default_factory=set)

    def fires(self, method: str, path: str) -> bool:
        if self.method not in ("*", method) or not re.search(self.pattern, path):
            return False
        self.hits += 1
        if self.paths is not None:
            if path not in self.chosen:
                if self.hits <= self.skip or len(self.chosen) >= self.paths:
                    return False
                self.chosen.add(path)
            self.fired += 1
            return True
        if self.hits > self.skip and self.fired < self.times:
            self.fired += 1
            return True
        return False


class S3FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 API server (moto_server) that answers chosen
    requests with real S3 errors (503 SlowDown, 500 InternalError, ...), drops or truncates them.

    Point BRANDMON_S3_ENDPOINT_URL at `url`: boto3's retries and our error mapping then see the
    same bytes as from AWS. Path-style requests only (`/bucket/key`), which is what boto3 sends
    to an endpoint given by IP address.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[S3Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()  # always read, so the connection stays usable after an error
                path = unquote(urlsplit(self.path).path)
                with outer._lock:
                    outer.requests.append((self.command, path))
                    fault = next((f for f in outer.faults if f.fires(self.command, path)), None)
                if fault is not None and fault.kind == "error":
                    return self._error(fault.code, path)
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if fault is not None and fault.kind == "action" and fault.action is not None:
                    fault.action()
                status, headers, data = outer._forward(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and not (name.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                if fault is not None and fault.kind == "truncate" and self.command != "HEAD":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return None
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None

            def _error(self, code: str, path: str) -> None:
                status, message = S3_ERRORS[code]
                request_id = uuid.uuid4().hex[:16].upper()
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
                    f"<RequestId>{request_id}</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("x-amz-request-id", request_id)
                if self.command == "HEAD":
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="s3-fault-proxy", daemon=True)

    def _forward(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            sent["Content-Length"] = str(len(body))
            conn.request(method, target, body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, list(resp.getheaders()), data
        finally:
            conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def fault(self, method: str, pattern: str, kind: str = "error", **kw: Any) -> S3Fault:
        """Add a rule (see `S3Fault`); rules are tried in the order added."""
        if kind == "error" and kw.get("code", "SlowDown") not in S3_ERRORS:
            raise ValueError(f"unknown S3 error code {kw.get('code')!r}; known: {', '.join(S3_ERRORS)}")
        rule = S3Fault(method=method, pattern=pattern, kind=kind, **kw)
        with self._lock:
            self.faults.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def start(self) -> S3FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url`; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket=bucket)


def _up(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    pg = PostgresCluster().start()  # under /tmp: the postgres user may not reach the checkout
    (directory / "pg.dir").write_text(str(pg.base))
    moto = MotoServer(log=directory / "moto.log").start()
    (directory / "moto.pid").write_text(str(moto.proc.pid if moto.proc else ""))
    env = {
        "BRANDMON_TEST_PG_URL": pg.url,
        "BRANDMON_TEST_S3_ENDPOINT": moto.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    (directory / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    print(f"postgres on {pg.url}\nmoto S3 on {moto.url}\nsource {directory / 'env.sh'}")
    return 0


def _down(directory: Path) -> int:
    pg_dir = directory / "pg.dir"
    if pg_dir.exists():
        base = Path(pg_dir.read_text().strip())
        PostgresCluster(base).stop()
        shutil.rmtree(base, ignore_errors=True)
        pg_dir.unlink()
    pid_file = directory / "moto.pid"
    if pid_file.exists() and pid_file.read_text().strip():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.services", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path("var/services"))
    args = parser.parse_args(argv)
    try:
        return _up(args.dir.resolve()) if args.action == "up" else _down(args.dir.resolve())
    except (ServiceError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
