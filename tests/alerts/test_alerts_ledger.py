"""alert_ledger (migration 0006): the unique key that makes a second claim a no-op, the
migration's downgrade and upgrade on both backends."""

from __future__ import annotations

import datetime as dt

from alembic import command
from sqlalchemy import inspect, select

from pipeline.alerts import ledger
from pipeline.database import _alembic_config, current_revision, head_revision, upgrade
from pipeline.schema import alert_ledger, utcnow

ROW = {"rule": "r", "day": dt.date(2026, 10, 15), "key": "Acme|*|*|any", "destination": "hook", "late": False,
       "payload": {"kind": "spike"}, "status": "sending", "last_error": None}


def test_only_the_first_claim_wins_and_only_its_token_can_mark(make_ctx, backend):
    ctx = make_ctx(backend=backend)
    now = utcnow()
    with ctx.engine.begin() as conn:
        assert ledger.claim_new(conn, [ROW], "a" * 32, now) == 1
        assert ledger.claim_new(conn, [ROW, {**ROW, "destination": "mail"}], "b" * 32, now) == 1
        (row,) = [r for r in ledger.claimed(conn, "a" * 32)]
        assert not ledger.mark(conn, row["id"], "b" * 32, now, ok=True, error=None)  # not b's claim
        assert ledger.mark(conn, row["id"], "a" * 32, now, ok=False, error="HTTP 500")
        # failed with attempts left: a later run claims it again; a sent row never
        assert ledger.claim_retries(conn, ["r"], ["hook", "mail"], "c" * 32, now, max_attempts=2, lease_s=60) == 1
        assert ledger.claim_retries(conn, ["r"], ["hook"], "d" * 32, now, max_attempts=2, lease_s=60) == 0
        rows = {r["destination"]: r for r in conn.execute(select(alert_ledger)).mappings()}
    assert rows["hook"]["claim"] == "c" * 32 and rows["hook"]["attempts"] == 1
    assert rows["hook"]["last_error"] == "HTTP 500" and rows["mail"]["claim"] == "b" * 32


def test_migration_0006_downgrades_and_upgrades(make_ctx, backend):
    ctx = make_ctx(backend=backend)
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0005")
    assert current_revision(ctx.engine) == "0005" and "alert_ledger" not in inspect(ctx.engine).get_table_names()
    assert upgrade(ctx.engine) == head_revision() == "0008"
    uniques = inspect(ctx.engine).get_unique_constraints("alert_ledger")
    assert [sorted(u["column_names"]) for u in uniques] == [["day", "destination", "key", "rule"]]
