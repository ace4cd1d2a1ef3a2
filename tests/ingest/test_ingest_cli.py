"""`brandmon ingest | backfill | images` through the real entry point."""

from __future__ import annotations

import datetime as dt

import pytest
from ingest_helpers import config, jpeg

from pipeline.cli import main
from tests.support.feeds import FakeMastodon, mastodon_media, mastodon_status

DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)


@pytest.fixture
def cli_env(make_ctx, monkeypatch):
    srv = FakeMastodon().start()
    srv.add_bytes("/a.jpg", jpeg())
    srv.statuses = [mastodon_status(DAY + dt.timedelta(hours=h), f"#acme {h}", seq=h, tags=("acme",),
                                    media=[mastodon_media(srv.url + "/a.jpg")] if h == 3 else []) for h in range(0, 48, 3)]
    ctx = make_ctx(config([{"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme"], "backoff_s": 0.01}]))
    s = ctx.settings
    for k, v in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url, "BRANDMON_CONFIG": str(s.config_path),
                 "BRANDMON_HOME": str(s.home), "BRANDMON_AUTHOR_SALT": s.author_salt.get()}.items():
        monkeypatch.setenv(k, v)
    yield srv
    srv.stop()


def test_ingest_backfill_images_commands(cli_env, capsys):
    assert main(["ingest", "masto", "--start", "2026-10-02T00:00Z", "--end", "2026-10-02T12:00", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "masto 2026-10-02T00:00:00+00:00 .. 2026-10-02T12:00:00+00:00: fetched=" in out and " new=4 " in out
    assert "images_stored=1" in out
    assert main(["ingest", "masto", "--start", "2026-10-02T00:00Z", "--end", "2026-10-02T12:00"]) == 0
    assert "already complete (use --force" in capsys.readouterr().out
    assert main(["backfill", "masto", "--start", "2026-10-02", "--end", "2026-10-03", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "masto 2026-10-02 .. 2026-10-03:" in out and " new=12 " in out and "unchanged=4" in out and "windows=2" in out
    assert main(["images", "--quiet"]) == 0
    assert "images_stored=0" in capsys.readouterr().out


def test_cli_errors_are_one_line(cli_env, capsys):
    assert main(["ingest", "nope", "--start", "2026-10-02", "--end", "2026-10-03"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brandmon: error: unknown source 'nope'") and "Traceback" not in err
    assert main(["ingest", "masto", "--start", "2026-10-03", "--end", "2026-10-02"]) == 2
    assert "--end must be after --start" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["backfill", "masto", "--start", "yesterday", "--end", "2026-10-02"])
    assert "not a date" in capsys.readouterr().err
    cli_env.fault("/api/v1/timelines/tag/acme", "status", status=500, times=100)
    assert main(["ingest", "masto", "--start", "2026-10-04", "--end", "2026-10-05"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 500 after" in err and "Traceback" not in err
