"""Throwaway services for tests, benchmarks and CI: a Postgres cluster and an S3 API server.

Real services, not mocks: a private Postgres cluster (initdb + pg_ctl on 127.0.0.1, a free
port, durability off for speed) and `moto_server` speaking the S3 API. Used by
tests/conftest.py, the bench/ scripts, and `.ci/run` via
`python -m pipeline.testing up|down --dir DIR` (which writes DIR/env.sh to source).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if Path(d, name).exists():
            return str(Path(d, name))
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
    """A private cluster in `base`, trust auth on 127.0.0.1 only."""

    def __init__(self, base: Path | None = None, port: int | None = None) -> None:
        # The postgres user must reach the folder: default to a fresh one directly under /tmp.
        self.owns_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="brandmon-pg-"))
        self.data = self.base / "data"
        self.port = port or free_port()
        self.log = self.base / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> PostgresCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            init = subprocess.run(
                _as_pg_user([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
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
    parser = argparse.ArgumentParser(prog="python -m pipeline.testing", description=__doc__)
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
