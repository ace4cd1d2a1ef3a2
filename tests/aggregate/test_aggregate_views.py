"""BI views, their documentation, the example queries and the read-only Postgres role."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from agg_helpers import CONFIG, FakePost, add_posts, ts
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.aggregate.views import VIEWS, create_views, views_sql
from pipeline.schema import mention_daily

ROOT = Path(__file__).resolve().parents[2]
SQL = ROOT / "sql"
DAY = dt.date(2026, 10, 19)


def spiky_ctx(make_ctx, backend: str):
    """Ten quiet days of Acme, then a burst: one spike, share of voice against Globex."""
    ctx = make_ctx(CONFIG, backend)
    posts, pid = [], 1
    for i in range(11):
        day = DAY - dt.timedelta(days=10 - i)
        n = 2 if i < 10 else 20
        for k in range(n):
            posts.append(FakePost(pid, f"p{pid}", ts(day, 1 + k % 20), "acme rocks", author=f"u{k}"))
            pid += 1
        posts.append(FakePost(pid, f"p{pid}", ts(day, 23), "globex is fine", platform="bluesky"))
        pid += 1
    with ctx.engine.begin() as conn:
        add_posts(conn, posts)
    aggregate_dirty(ctx)
    create_views(ctx.engine)
    create_views(ctx.engine)  # idempotent
    return ctx


def test_views_sql_file_is_current():
    assert (SQL / "views.sql").read_text() == views_sql(), "run: python -m pipeline.aggregate.views > sql/views.sql"


def test_readme_documents_every_column():
    readme = (SQL / "README.md").read_text()
    for col in mention_daily.columns:
        assert f"| `{col.name}` |" in readme, col.name
    for name, body in VIEWS.items():
        assert f"### `{name}`" in readme
        select_list = body.split("FROM")[0]
        for col in re.findall(r"\bAS (\w+)", select_list):
            assert f"`{col}`" in readme, (name, col)


def test_db_upgrade_creates_the_views_and_their_index(make_ctx, backend):
    """`brandmon db upgrade` (revision 0002) creates the views: no separate step for BI users."""
    from pipeline.database import current_revision, head_revision, upgrade

    ctx = make_ctx(CONFIG, backend)
    assert current_revision(ctx.engine) == head_revision()
    insp = inspect(ctx.engine)
    assert set(VIEWS) <= set(insp.get_view_names())
    assert "ix_mention_daily_spikes" in {ix["name"] for ix in insp.get_indexes("mention_daily")}
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(1, "p1", ts(DAY), "acme")])
    aggregate_dirty(ctx)
    upgrade(ctx.engine)  # a no-op at head
    with ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT posts FROM v_daily_trend WHERE day = :d AND brand = 'Acme' "
                                 "AND product = '*' AND platform = '*' AND source = 'any'"), {"d": DAY}).scalar() == 1


def test_views_answer_their_questions(make_ctx, backend):
    ctx = spiky_ctx(make_ctx, backend)
    assert set(VIEWS) <= set(inspect(ctx.engine).get_view_names())
    with ctx.engine.connect() as conn:
        trend = conn.execute(text(
            "SELECT day, posts, rolling_7, spike FROM v_daily_trend WHERE brand = 'Acme' AND product = '*' "
            "AND platform = '*' AND source = 'any' ORDER BY day")).all()
        assert [r.posts for r in trend] == [2] * 10 + [20]
        assert bool(trend[-1].spike) and not any(bool(r.spike) for r in trend[:-1])
        sov = conn.execute(text(
            "SELECT brand, posts, total_posts, share_of_voice, brand_rank FROM v_share_of_voice "
            "WHERE day = :d AND platform = '*' AND source = 'any' ORDER BY brand_rank, brand"), {"d": DAY}).all()
        assert [(r.brand, r.posts, r.total_posts, r.brand_rank) for r in sov] == [
            ("Acme", 20, 21, 1), ("Globex", 1, 21, 2), ("Initech", 0, 21, 3)]
        assert sov[0].share_of_voice == pytest.approx(20 / 21)
        spikes = conn.execute(text("SELECT day, brand, product, platform, source, posts, baseline, excess, zscore "
                                   "FROM v_spikes ORDER BY zscore DESC")).all()
        assert {(r.brand, r.platform, r.source) for r in spikes} == {("Acme", p, s) for p in ("*", "mastodon") for s in ("text", "any")}
        top = spikes[0]
        # baseline = the mean the z-score compares to: the days before the spike, not rolling_28
        # (which includes the spike day: (2 * 10 + 20) / 11)
        assert top.posts == 20 and top.baseline == pytest.approx(2.0) and top.zscore == pytest.approx(18.0)
        assert top.excess == pytest.approx(18.0)
        rolling_28 = conn.execute(text(
            "SELECT rolling_28 FROM v_daily_trend WHERE day = :d AND brand = 'Acme' AND product = '*' "
            "AND platform = '*' AND source = 'any'"), {"d": DAY}).scalar()
        assert rolling_28 == pytest.approx((2 * 10 + 20) / 11) != top.baseline
        # Every example query runs.
        code = "\n".join(line.split("--")[0] for line in (SQL / "examples.sql").read_text().splitlines())
        stmts = [s for s in code.split(";") if s.strip()]
        assert len(stmts) == 10
        for stmt in stmts:
            assert conn.execute(text(stmt)).all() is not None


def _psql() -> str:
    from tests.support.services import _pg_bin

    return _pg_bin("psql")


def _run_role_script(url: str, role: str, password: str) -> subprocess.CompletedProcess:
    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return subprocess.run(
        [_psql(), libpq, "-X", "-q", "-v", f"role={role}", "-f", str(SQL / "readonly_role.sql")],
        env={**os.environ, "BRANDMON_BI_PASSWORD": password}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.integration
def test_readonly_role_reads_views_and_nothing_else(make_ctx, pg_admin_url):
    ctx = spiky_ctx(make_ctx, "postgres")
    role = f"bi_{uuid.uuid4().hex[:8]}"
    url = ctx.settings.database_url
    first = _run_role_script(url, role, "s3cret-1")
    assert first.returncode == 0, first.stderr
    assert all(v in first.stdout for v in VIEWS) and "mention_daily" not in first.stdout, first.stdout
    again = _run_role_script(url, role, "s3cret-2")  # idempotent: re-run resets the password
    assert again.returncode == 0, again.stderr
    missing = subprocess.run([_psql(), make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                              "-X", "-q", "-f", str(SQL / "readonly_role.sql")], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "BRANDMON_BI_PASSWORD"}, timeout=60)
    assert missing.returncode != 0 and "role=" in missing.stdout + missing.stderr

    ro = create_engine(make_url(url).set(username=role, password="s3cret-2"), isolation_level="AUTOCOMMIT")
    try:
        with ro.connect() as conn:
            for view in VIEWS:
                assert conn.execute(text(f"SELECT COUNT(*) FROM {view}")).scalar() > 0
            assert conn.execute(text("SHOW default_transaction_read_only")).scalar() == "on"
        forbidden = [
            "SELECT * FROM mention_daily LIMIT 1",
            "SELECT * FROM posts LIMIT 1",
            "SELECT author_hash FROM posts LIMIT 1",
            "INSERT INTO mention_daily (day, brand, product, platform, source, posts, images, unique_authors, "
            "reposts, spike, computed_at) VALUES ('2030-01-01', 'x', '*', '*', 'any', 1, 0, 1, 0, false, now())",
            "UPDATE mention_daily SET posts = 0",
            "DELETE FROM v_daily_trend",
            "UPDATE v_daily_trend SET posts = 0",
            "CREATE TABLE sneaky (x int)",
            "CREATE VIEW sneaky AS SELECT 1",
        ]
        for stmt in forbidden:
            for prefix in ("", "SET TRANSACTION READ WRITE; "):
                with ro.connect() as conn, pytest.raises(DBAPIError) as err:
                    conn.execute(text(prefix + stmt))
                assert "permission denied" in str(err.value) or "read-only transaction" in str(err.value), stmt
    finally:
        ro.dispose()
        admin = create_engine(make_url(pg_admin_url).set(database=make_url(url).database), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


def test_migration_0004_from_0003_and_back(make_ctx, backend):
    """0004 on a database with aggregates: the new tables and column, v_spikes' baseline from
    it, every aggregated day queued for restating; the next aggregate fills the baseline.
    Downgrading restores the 0003 views; upgrading again works."""
    from alembic import command

    from pipeline.database import _alembic_config, current_revision, upgrade

    ctx = spiky_ctx(make_ctx, backend)
    days = 11
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0003")
    assert current_revision(ctx.engine) == "0003"
    insp = inspect(ctx.engine)
    assert "baseline" not in {c["name"] for c in insp.get_columns("mention_daily")}
    assert not {"text_match_state", "logo_class_map"} & set(insp.get_table_names())
    with ctx.engine.connect() as conn:
        old = conn.execute(text("SELECT posts, baseline FROM v_spikes WHERE platform = '*' AND source = 'any'")).one()
        assert old.baseline == pytest.approx((2 * 10 + 20) / 11)  # 0002's rolling_28
        assert conn.execute(text("SELECT COUNT(*) FROM dirty_days")).scalar() == 0

    upgrade(ctx.engine, "0004")
    assert current_revision(ctx.engine) == "0004"
    with ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM dirty_days WHERE reason = 'migration 0004'")).scalar() == days
        assert conn.execute(text("SELECT baseline FROM v_spikes WHERE platform = '*' AND source = 'any'")).scalar() is None
    upgrade(ctx.engine)  # the later revisions, which the code below expects
    res = aggregate_dirty(ctx)
    assert res["days"] == days and res["posts_matched"] == 2 * 10 + 20 + 11
    with ctx.engine.connect() as conn:
        new = conn.execute(text("SELECT posts, baseline, excess FROM v_spikes WHERE platform = '*' AND source = 'any'")).one()
        last = conn.execute(text("SELECT baseline FROM v_daily_trend WHERE day = :d AND brand = 'Acme' "
                                 "AND product = '*' AND platform = '*' AND source = 'any'"), {"d": DAY}).scalar()
    assert new.baseline == pytest.approx(2.0) == last and new.excess == pytest.approx(18.0)
