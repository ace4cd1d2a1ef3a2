"""Schema and migrations on SQLite and Postgres; upserts; UTC timestamps."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from pipeline import schema
from pipeline.database import (
    current_revision,
    head_revision,
    make_engine,
    require_schema,
    upgrade,
    upsert,
)
from pipeline.errors import DatabaseError


def test_upgrade_creates_every_table_and_is_repeatable(make_ctx, backend: str) -> None:
    ctx = make_ctx(backend=backend)
    assert current_revision(ctx.engine) == head_revision()
    assert upgrade(ctx.engine) == head_revision()  # second run: no-op
    from sqlalchemy import inspect

    assert set(schema.metadata.tables) <= set(inspect(ctx.engine).get_table_names())


def test_migrated_schema_matches_the_code(make_ctx, backend: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    ctx = make_ctx(backend=backend)
    with ctx.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def test_upsert_and_utc_round_trip(make_ctx, backend: str) -> None:
    ctx = make_ctx(backend=backend)
    t = dt.datetime(2026, 10, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    row = dict(platform="p", external_id="1", source="s", author_hash="a", text="hi", posted_at=t, content_hash="h1")
    with ctx.engine.begin() as conn:
        upsert(conn, schema.posts, [row], keys=["platform", "external_id"])
        upsert(conn, schema.posts, [{**row, "text": "edited", "content_hash": "h2"}], keys=["platform", "external_id"])
        upsert(conn, schema.posts, [{**row, "text": "ignored"}], keys=["platform", "external_id"], update=())
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(schema.posts.c.text, schema.posts.c.posted_at)).all()
    assert len(rows) == 1
    assert rows[0].text == "edited"
    assert rows[0].posted_at == t and rows[0].posted_at.utcoffset() == dt.timedelta(0)
    assert rows[0].posted_at.date() == dt.date(2026, 10, 2)  # UTC day, not the local one


def test_naive_datetimes_are_refused(make_ctx) -> None:
    ctx = make_ctx()
    with pytest.raises(Exception, match="naive datetime"), ctx.engine.begin() as conn:
        conn.execute(schema.dirty_days.insert().values(day=dt.date(2026, 1, 1), reason="x",
                                                       marked_at=dt.datetime(2026, 1, 1)))


def test_require_schema_says_run_upgrade(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseError, match="brandmon db upgrade"):
        require_schema(engine)


def test_unreachable_database_is_one_line(tmp_path) -> None:
    from tests.support.services import free_port

    engine = make_engine(f"postgresql+psycopg2://u:s3cret@127.0.0.1:{free_port()}/x?connect_timeout=2")
    with pytest.raises(DatabaseError) as exc:
        require_schema(engine)
    msg = str(exc.value)
    assert "cannot reach the database" in msg and "BRANDMON_DATABASE_URL" in msg
    assert "s3cret" not in msg and "\n" not in msg


def test_migration_0005_gives_old_quarantine_rows_their_window_end_and_downgrades(make_ctx, backend: str) -> None:
    """Rows written before 0005 take the end of their window's succeeded ingest run."""
    from alembic import command
    from sqlalchemy import text

    from pipeline.database import _alembic_config

    ctx = make_ctx(backend=backend)
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0004")
    start, end = dt.datetime(2026, 10, 1, tzinfo=dt.UTC), dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
    now = dt.datetime(2026, 10, 3, tzinfo=dt.UTC)
    with ctx.engine.begin() as conn:
        conn.execute(text("INSERT INTO runs (kind, source, window_start, window_end, status, started_at, counts) "
                          "VALUES ('ingest', 's', :a, :b, 'succeeded', :n, '{}')"), {"a": start, "b": end, "n": now})
        for window_start, ref in ((start, "s:1"), (None, "s:2")):
            conn.execute(text("INSERT INTO quarantine (source, window_start, kind, record_ref, reason, created_at) "
                              "VALUES ('s', :w, 'record', :r, 'bad', :n)"), {"w": window_start, "r": ref, "n": now})
    assert upgrade(ctx.engine) == head_revision()
    with ctx.engine.connect() as conn:
        ends = {r.record_ref: r.window_end for r in conn.execute(select(schema.quarantine))}
    assert ends == {"s:1": end, "s:2": None}
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0004")
    assert current_revision(ctx.engine) == "0004"
    assert upgrade(ctx.engine) == head_revision()


def _view_columns(conn, select_sql: str) -> list[str]:
    from sqlalchemy import text

    return list(conn.execute(text(f"SELECT * FROM ({select_sql}) AS q LIMIT 0")).keys())


def test_a_fresh_upgrade_uses_the_migrations_frozen_views_not_the_live_ones(make_ctx, backend: str, monkeypatch) -> None:
    """From zero to head with the code's views broken: the migrations hold their own copies
    (0002, 0004, 0007), and no revision imports application code (not even `pipeline.schema`'s
    column type), so a later change of the package cannot break `db upgrade` on a fresh
    database. At head the views are the code's (same columns)."""
    import ast
    from pathlib import Path

    from alembic import command

    from pipeline.aggregate import views as live
    from pipeline.database import _alembic_config

    versions = Path(__file__).resolve().parents[1] / "pipeline" / "migrations" / "versions"
    for path in sorted(versions.glob("0*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("pipeline"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("pipeline")]
                assert not names, f"{path.name} imports {names}"

    ctx = make_ctx(backend=backend)
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "base")
    assert current_revision(ctx.engine) is None
    broken = "\nSELECT no_such_column FROM no_such_table"
    monkeypatch.setattr(live, "VIEWS", {name: broken for name in live.VIEWS})
    monkeypatch.setattr(live, "TABLE_VIEWS", {name: (t, broken) for name, (t, _b) in live.TABLE_VIEWS.items()})
    monkeypatch.setattr(live, "create_views", lambda *a, **k: pytest.fail("a migration ran the live views"))
    assert upgrade(ctx.engine) == head_revision()
    monkeypatch.undo()
    code_views = {**live.VIEWS, **{name: body for name, (_t, body) in live.TABLE_VIEWS.items()}}
    with ctx.engine.connect() as conn:
        for name, body in code_views.items():
            assert _view_columns(conn, f"SELECT * FROM {name}") == _view_columns(conn, body), name
