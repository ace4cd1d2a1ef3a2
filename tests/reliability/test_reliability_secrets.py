"""Secrets never leave the environment: runs that succeed and fail (through the CLI, with debug
logging), then a grep of everything they wrote for the secret values (and their base64 forms):
stdout/stderr, captured logs, every row of every table (run log, quarantine, cursors, ...),
every lake object (gzip opened), the files under BRANDMON_HOME and the Postgres server log.

The secrets: the feeds' credentials, the author salt, the database password (a dedicated
cluster that requires scram passwords over TCP, so the password is really used) and the AWS
secret key (moto signs nothing, so the S3 fault proxy answers SignatureDoesNotMatch for the
failing runs, as S3 does for a wrong key)."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from rel_helpers import DAY, END, ctx_env
from sqlalchemy import select

from pipeline.context import Context
from pipeline.errors import DatabaseError
from pipeline.ingest.jobs import ingest_window
from pipeline.schema import metadata
from tests.support.feeds import (
    FakeBluesky,
    FakeMastodon,
    FakeReddit,
    bluesky_post,
    mastodon_status,
    reddit_post,
)
from tests.support.services import PostgresCluster

pytestmark = pytest.mark.integration

BSKY_PASSWORD = "bsky-APP-PASS-7c1d-reliability"
REDDIT_SECRET = "reddit-SECRET-9f2e-reliability"
MASTO_TOKEN = "masto-TOKEN-3a5b-reliability"
SALT = "salt-AUTHOR-4b8a-reliability"
DB_PASSWORD = "db-PASS/w0rd@5e7a:reliability"  # URL-special characters on purpose
WRONG_DB_PASSWORD = "db-WRONG-8c3f-reliability"
ADMIN_PASSWORD = "pg-ADMIN-2d9b-reliability"
AWS_KEY_ID = "AKIARELIABILITY7Q2X"
AWS_SECRET = "aws-SECRET-KEY-6d2f/reliability+Zx"
SECRET_ENV = {"REL_BSKY_PASSWORD": BSKY_PASSWORD, "REL_REDDIT_ID": "rel-client", "REL_REDDIT_SECRET": REDDIT_SECRET,
              "REL_MASTO_TOKEN": MASTO_TOKEN}
CLI = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def forms(secret: str) -> list[bytes]:
    """The secret as text and in the encodings a leak would likely use (Basic auth, base64)."""
    raw = secret.encode()
    return [raw, base64.b64encode(raw), base64.b64encode(f"rel-client:{secret}".encode()), base64.b32encode(raw)]


def cli(ctx: Any, *args: str, **env: str) -> tuple[int, bytes]:
    proc = subprocess.run([sys.executable, "-c", CLI, "-vv", *args], env={**ctx_env(ctx, **SECRET_ENV), **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def password_db() -> Iterator[tuple[str, PostgresCluster]]:
    """A database owned by role `brandmon`, on a cluster that requires passwords over TCP."""
    from sqlalchemy import create_engine, text

    cluster = PostgresCluster(password=ADMIN_PASSWORD).start()
    try:
        admin = create_engine(cluster.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE ROLE brandmon LOGIN PASSWORD :pw"), {"pw": DB_PASSWORD})
            conn.execute(text("CREATE DATABASE brandmon OWNER brandmon"))
        admin.dispose()
        yield f"postgresql+psycopg2://brandmon:{quote(DB_PASSWORD, safe='')}@127.0.0.1:{cluster.port}/brandmon", cluster
    finally:
        cluster.stop()


def window(day: dt.datetime) -> list[str]:
    return ["--start", day.isoformat(), "--end", (day + dt.timedelta(days=1)).isoformat()]


def test_secrets_never_written(make_ctx, monkeypatch, caplog, tally, password_db, s3_proxy):
    db_url, cluster = password_db
    for k, v in {**SECRET_ENV, "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
                 "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level("DEBUG")
    with (
        FakeBluesky(password=BSKY_PASSWORD) as sky,
        FakeReddit(client_id="rel-client", client_secret=REDDIT_SECRET) as rd,
        FakeMastodon() as masto,
    ):
        sky.posts = [bluesky_post(DAY + dt.timedelta(hours=h), f"acme sky {h}", did=f"did:plc:a{h}") for h in range(3)]
        rd.posts = [reddit_post(DAY + dt.timedelta(hours=h), f"acme reddit {h}", pid=f"r{h}", author=f"bob{h}") for h in range(3)]
        masto.statuses = [mastodon_status(DAY + dt.timedelta(hours=h), f"acme masto {h}", seq=h, tags=("acme",)) for h in range(3)]
        bad = mastodon_status(DAY + dt.timedelta(hours=5), "acme", seq=9, tags=("acme",))
        bad["account"] = None
        masto.statuses.append(bad)
        sources = [
            {"name": "sky", "kind": "bluesky", "base_url": sky.url, "queries": ["acme"], "identifier": "brandmon.bsky.social",
             "password_env": "REL_BSKY_PASSWORD", "backoff_s": 0.01},
            {"name": "rd", "kind": "reddit", "oauth_base_url": rd.url, "auth_url": rd.url + "/api/v1/access_token",
             "subreddits": ["brands"], "client_id_env": "REL_REDDIT_ID", "client_secret_env": "REL_REDDIT_SECRET", "backoff_s": 0.01},
            {"name": "masto", "kind": "mastodon", "base_url": masto.url, "hashtags": ["acme"], "token_env": "REL_MASTO_TOKEN",
             "backoff_s": 0.01},
        ]
        config = {"brands": [{"name": "Acme", "keywords": ["acme"]}], "sources": sources,
                  "network": {"max_retries": 1, "allowed_private_hosts": ["127.0.0.1"]}}
        ctx = make_ctx(config, "postgres", env={"BRANDMON_AUTHOR_SALT": SALT, "BRANDMON_DATABASE_URL": db_url})
        outputs: list[bytes] = []
        codes = []
        for name in ("sky", "rd", "masto"):  # succeed
            code, out = cli(ctx, "ingest", name, *window(DAY), "--quiet")
            codes.append(code)
            outputs.append(out)
        rd.fault("/r/brands/new.json", "status", status=500, times=100)  # fail: the API keeps failing
        code, out = cli(ctx, "ingest", "rd", *window(END), "--quiet")
        codes.append(code)
        outputs.append(out)
        sky.password = "rotated-elsewhere"  # fail: the app password was revoked -> 401 on createSession
        code, out = cli(ctx, "ingest", "sky", *window(END), "--quiet")
        codes.append(code)
        outputs.append(out)
        for cmd in (["aggregate", "--quiet"], ["status"]):
            code, out = cli(ctx, *cmd)
            codes.append(code)
            outputs.append(out)
        # fail: a wrong database password (the right one rotated away), on upgrade and on a run
        wrong_db = db_url.replace(quote(DB_PASSWORD, safe=""), WRONG_DB_PASSWORD)
        for cmd in (["db", "upgrade"], ["ingest", "masto", *window(END), "--quiet"]):
            code, out = cli(ctx, *cmd, BRANDMON_DATABASE_URL=wrong_db)
            codes.append(code)
            outputs.append(out)
        # fail: S3 refuses the signature (a wrong secret key), on the lake check and mid-run
        for method, cmd in (("*", ["db", "upgrade"]), ("PUT", ["ingest", "masto", *window(DAY), "--force", "--quiet"])):
            s3_proxy.fault(method, ".*", code="SignatureDoesNotMatch", times=10**6)
            code, out = cli(ctx, *cmd, BRANDMON_S3_ENDPOINT_URL=s3_proxy.url)
            codes.append(code)
            outputs.append(out)
            s3_proxy.clear()
        # The same failures in-process, for the captured log records and exception texts.
        errors = []
        for name in ("rd", "sky"):
            with pytest.raises(Exception) as info:  # noqa: B017 - any error; its text is checked below
                ingest_window(ctx, name, END + dt.timedelta(days=1), END + dt.timedelta(days=2))
            errors.append(f"{info.value!r} {info.value}".encode())
        refused = Context(ctx.settings.with_overrides(s3_endpoint_url=s3_proxy.url))
        s3_proxy.fault("PUT", ".*", code="InvalidAccessKeyId", times=10**6)
        with pytest.raises(Exception) as info:  # noqa: B017
            ingest_window(refused, "masto", DAY, END, force=True)
        refused.close()
        errors.append(f"{info.value!r} {info.value}".encode())
        s3_proxy.clear()
        wrong = Context(ctx.settings.with_overrides(database_url=wrong_db))
        with pytest.raises(DatabaseError) as info:
            wrong.ready()
        wrong.close()
        errors.append(f"{info.value!r} {info.value}".encode())
        tokens = [t.encode() for t in (*sky.tokens, *rd.tokens)]
    assert codes[:3] == [0, 0, 0] and codes[3] != 0 and codes[4] != 0 and codes[5:7] == [0, 0], outputs
    assert codes[7:] == [2, 2, 2, 2], outputs[7:]
    assert b"HTTP 500" in outputs[3] and b"401" in outputs[4]
    assert all(b"password authentication failed" in o for o in outputs[7:9]), outputs[7:9]
    assert all(b"check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in o for o in outputs[9:11]), outputs[9:11]
    assert b"SignatureDoesNotMatch" in outputs[10]
    assert b"InvalidAccessKeyId" in errors[2] and b"password authentication failed" in errors[3]
    tally.fault("runs failing with secrets set", 9)

    blobs: list[bytes] = [*outputs, *errors, caplog.text.encode()]
    with ctx.engine.connect() as conn:
        for table in metadata.sorted_tables:
            blobs += [repr(tuple(r)).encode() for r in conn.execute(select(table))]
        assert conn.execute(select(metadata.tables["runs"].c.status)).all()  # the run log is not empty
    lake = list(ctx.store.list(""))
    assert any(k.startswith("raw/source=sky/") for k in lake) and any(k.startswith("raw/source=rd/") for k in lake)
    for key in lake:
        data = ctx.store.get(key)
        blobs.append(gzip.decompress(data) if key.endswith(".gz") else data)
    blobs += [p.read_bytes() for p in ctx.settings.home.rglob("*") if p.is_file()]
    blobs.append(cluster.log.read_bytes())  # the database server's own log
    everything = b"\n".join(blobs)
    assert b"acme sky 1" in everything and b"HTTP 500" in everything  # the grep sees real content
    assert b"brandmon" in cluster.log.read_bytes()  # the failed logins were logged (without passwords)
    secrets = (BSKY_PASSWORD, REDDIT_SECRET, MASTO_TOKEN, SALT, DB_PASSWORD, quote(DB_PASSWORD, safe=""),
               WRONG_DB_PASSWORD, ADMIN_PASSWORD, AWS_SECRET)
    leaks = [s[:6] + b"..." for secret in secrets for s in forms(secret) if s in everything]
    leaks += [t[:8] + b"..." for t in tokens if t in everything]
    tally.secret_scan(len(secrets) * len(forms(SALT)) + len(tokens), len(everything), len(leaks))
    assert not leaks, f"secrets found in what the runs wrote: {leaks}"
