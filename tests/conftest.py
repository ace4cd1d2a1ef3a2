"""Shared fixtures: fresh pipeline contexts on SQLite + local folder, or Postgres + S3.

Postgres and the S3 API server are real: taken from BRANDMON_TEST_PG_URL /
BRANDMON_TEST_S3_ENDPOINT (CI starts them), else started here for the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# moto accepts any credentials; set them before any boto3 client exists.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.context import Context  # noqa: E402
from pipeline.database import upgrade  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from tests.support.services import (  # noqa: E402
    MotoServer,
    PostgresCluster,
    S3FaultProxy,
    create_bucket,
    create_database,
    drop_database,
)

# Tests that read the real FlickrLogos-27 photos run when BRANDMON_FL27_DIR names them; on a
# machine laid out like CI's (shared/ beside the checkout) that is the default.
_FL27 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flickr_logos_27"
if not os.environ.get("BRANDMON_FL27_DIR") and (_FL27 / "annotations.txt").is_file():
    os.environ["BRANDMON_FL27_DIR"] = str(_FL27)

TEST_SALT = "test-salt-5f1c0ffee"


# --- pytest-xdist (`make test` runs on 2 workers) --------------------------------------------

_worker_tallies: list[dict[str, Any]] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: keep each worker's reliability tally (tests/reliability/conftest.py)."""
    tally = getattr(node, "workeroutput", {}).get("reliability_tally")
    if tally:
        _worker_tallies.append(tally)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """xdist controller: the reliability summary, summed over the workers (without xdist,
    tests/reliability/conftest.py prints it itself)."""
    if not _worker_tallies:
        return
    from tests.reliability.rel_helpers import Tally

    total = Tally()
    for tally in _worker_tallies:
        total.merge(tally)
    if not (total.totals["tests_passed"] or total.totals["tests_failed"]):
        return
    terminalreporter.section("brandmon reliability summary")
    for line in total.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """Admin URL of a real Postgres server (tests create their own databases on it)."""
    url = os.environ.get("BRANDMON_TEST_PG_URL")
    if url:
        yield url
        return
    cluster = PostgresCluster().start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint of a real S3 API server (moto_server)."""
    url = os.environ.get("BRANDMON_TEST_S3_ENDPOINT")
    if url:
        yield url
        return
    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _s3_proxy_server(s3_endpoint: str) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_endpoint) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(_s3_proxy_server: S3FaultProxy) -> Iterator[S3FaultProxy]:
    """An HTTP proxy in front of the S3 API server that answers chosen requests with real S3
    errors (`proxy.fault(...)`); point BRANDMON_S3_ENDPOINT_URL at `proxy.url`. No rules at start."""
    _s3_proxy_server.clear()
    yield _s3_proxy_server
    _s3_proxy_server.clear()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrise a test over both backend pairs: SQLite + local folder, Postgres + S3."""
    return request.param


def write_config(directory: Path, config: dict[str, Any] | None) -> Path | None:
    if config is None:
        return None
    path = directory / "brandmon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def make_ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Context]]:
    """Factory: `make_ctx(config=None, backend="sqlite", env=None)` -> a fresh, upgraded Context."""
    made: list[tuple[Context, str | None]] = []

    def factory(config: dict[str, Any] | None = None, backend: str = "sqlite", env: dict[str, str] | None = None) -> Context:
        root = tmp_path / f"ctx{len(made)}"
        root.mkdir()
        cfg_path = write_config(root, config)
        base_env = {
            "BRANDMON_HOME": str(root / "var"),
            "BRANDMON_AUTHOR_SALT": TEST_SALT,
            **({"BRANDMON_CONFIG": str(cfg_path)} if cfg_path else {}),
        }
        db_name = None
        if backend == "sqlite":
            base_env["BRANDMON_DATABASE_URL"] = f"sqlite:///{root / 'brandmon.db'}"
            base_env["BRANDMON_STORAGE_URL"] = (root / "lake").as_uri()
        elif backend == "postgres":
            admin = request.getfixturevalue("pg_admin_url")
            endpoint = request.getfixturevalue("s3_endpoint")
            db_name = f"t_{uuid.uuid4().hex[:12]}"
            bucket = f"lake-{uuid.uuid4().hex[:12]}"
            create_bucket(endpoint, bucket)
            base_env["BRANDMON_DATABASE_URL"] = create_database(admin, db_name)
            base_env["BRANDMON_STORAGE_URL"] = f"s3://{bucket}/lake"
            base_env["BRANDMON_S3_ENDPOINT_URL"] = endpoint
        else:
            raise ValueError(f"unknown backend {backend!r}")
        base_env.update(env or {})
        ctx = Context(load_settings(env=base_env))
        upgrade(ctx.engine)
        ctx.store.check()
        made.append((ctx, db_name))
        return ctx

    yield factory
    for ctx, db_name in made:
        ctx.close()
        if db_name:
            drop_database(request.getfixturevalue("pg_admin_url"), db_name)
