"""`brandmon aggregate | trends | report` end to end through the CLI entry point."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from agg_helpers import CONFIG, FakePost, add_posts, ts

from pipeline.cli import main

START = dt.date(2026, 10, 1)
TEST_SALT = "test-salt-5f1c0ffee"


@pytest.fixture
def cli_ctx(make_ctx, monkeypatch):
    """A context with 12 days of posts, and the environment pointing the CLI at it."""
    ctx = make_ctx(CONFIG)
    posts, pid = [], 1
    for i in range(12):
        day = START + dt.timedelta(days=i)
        for k in range(3 if i != 11 else 30):
            posts.append(FakePost(pid, f"p{pid}", ts(day, k % 24), "Acme One is great" if k % 3 else "globex",
                                  platform="bluesky" if k % 2 else "mastodon", author=f"u{k}"))
            pid += 1
    with ctx.engine.begin() as conn:
        add_posts(conn, posts)
    s = ctx.settings
    monkeypatch.setenv("BRANDMON_DATABASE_URL", s.database_url)
    monkeypatch.setenv("BRANDMON_STORAGE_URL", s.storage_url)
    monkeypatch.setenv("BRANDMON_CONFIG", str(s.config_path))
    monkeypatch.setenv("BRANDMON_HOME", str(s.home))
    monkeypatch.setenv("BRANDMON_AUTHOR_SALT", TEST_SALT)
    return ctx


def test_aggregate_then_trends_in_every_format(cli_ctx, capsys, tmp_path):
    assert main(["aggregate", "--quiet"]) == 0
    assert "aggregated 12 day(s)" in capsys.readouterr().out
    assert main(["aggregate", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["days"] == 0  # nothing dirty any more
    assert main(["aggregate", "--start", "2026-10-01", "--end", "2026-10-12", "--quiet", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["days"] == 12 and again["rows_changed"] == 0

    base = ["trends", "--brand", "ACME", "--start", "2026-09-30", "--end", "2026-10-12"]
    assert main(base) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["day", "posts", "images"]
    assert table[1].split()[:2] == ["2026-09-30", "0"]  # not aggregated: zero, no signals
    assert table[2].split()[:2] == ["2026-10-01", "2"]
    assert "yes" in table[13]  # the burst on the last day is a spike

    assert main([*base, "--format", "csv", "--product", "acme one", "--platform", "bluesky"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 13 and rows[0]["computed"] == "False"
    assert [int(r["posts"]) for r in rows[1:]] == [1] * 11 + [10]

    plot = tmp_path / "acme.png"
    assert main([*base, "--format", "json", "--source", "text", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[-1]["day"] == "2026-10-12" and data[-1]["posts"] == 20 and data[-1]["spike"] is True
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_cli_errors_are_one_line(cli_ctx, capsys):
    assert main(["aggregate", "--start", "2026-10-01"]) == 2
    assert "give both --start and --end" in capsys.readouterr().err
    assert main(["aggregate", "--start", "2026-10-05", "--end", "2026-10-01"]) == 2
    assert "before --start" in capsys.readouterr().err
    assert main(["trends", "--brand", "Nope", "--start", "2026-10-01", "--end", "2026-10-02"]) == 2
    err = capsys.readouterr().err
    assert "unknown brand 'Nope'" in err and "Acme, Globex, Initech" in err and "Traceback" not in err
    assert main(["trends", "--brand", "Acme", "--product", "Acme Nine", "--start", "2026-10-01", "--end", "2026-10-02"]) == 2
    assert "has no product" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trends", "--brand", "Acme", "--start", "yesterday", "--end", "2026-10-02"])
    assert "not a date" in capsys.readouterr().err


def test_report_written_to_the_lake(cli_ctx, capsys):
    assert main(["aggregate", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "--date", "2026-10-12"]) == 0
    assert "reports/daily/2026-10-12.html" in capsys.readouterr().out
    page = cli_ctx.store.get("reports/daily/2026-10-12.html").decode()
    assert page.startswith("<!doctype html>")
    assert page.count("data:image/png;base64,") == 3  # one chart per brand
    for brand in ("Acme", "Globex", "Initech"):
        assert f"<td>{brand}</td>" in page
    assert "<td>2026-10-12</td><td>Acme</td>" in page  # the spike is listed
    assert "<td>66.7%</td>" in page  # Acme: 20 of the 30 brand mentions that day
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained
