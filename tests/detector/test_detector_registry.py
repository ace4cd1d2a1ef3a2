"""Registry activation policy (a retrain replaces the active model only when it beats it) and
the one-active-model rule (migration 0008) on both backends."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from alembic import command
from sqlalchemy import inspect, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.database import _alembic_config, current_revision, head_revision, upgrade
from pipeline.detector.registry import (
    activate,
    active_row,
    active_version,
    maybe_activate,
    register,
)
from pipeline.schema import model_versions, utcnow


def _register(ctx, f1: float) -> str:
    spec = SimpleNamespace(classes=["no_logo", "Acme"], base="inception_v3", weights="none", input_size=75, threshold=0.5)
    return register(ctx, spec, f"artifact-{f1}".encode(), "fp", {"f1": f1}, {})


@pytest.mark.parametrize(("new_f1", "activated"), [(0.81, True), (0.80, False), (0.79, False)])
def test_if_better_activates_only_a_strictly_better_model(make_ctx, new_f1, activated):
    ctx = make_ctx()
    first = _register(ctx, 0.80)
    assert maybe_activate(ctx, first, "if_better")  # nothing active yet: the first one wins
    second = _register(ctx, new_f1)
    assert maybe_activate(ctx, second, "if_better") is activated
    assert active_version(ctx)["version"] == (second if activated else first)


def test_never_and_always(make_ctx):
    ctx = make_ctx()
    v1 = _register(ctx, 0.9)
    assert not maybe_activate(ctx, v1, "never") and active_version(ctx) is None
    assert maybe_activate(ctx, v1, "always")
    v2 = _register(ctx, 0.1)
    assert maybe_activate(ctx, v2, "always") and active_version(ctx)["version"] == v2


def _active(ctx) -> list[str]:
    with ctx.engine.connect() as conn:
        return sorted(v for (v,) in conn.execute(select(model_versions.c.version).where(model_versions.c.active.is_(True))))


def test_a_second_activation_leaves_one_active_and_the_database_refuses_two(make_ctx, backend):
    ctx = make_ctx(backend=backend)
    v1, v2 = _register(ctx, 0.5), _register(ctx, 0.6)
    activate(ctx, v1)
    activate(ctx, v2)
    activate(ctx, v2)  # again: still one
    assert _active(ctx) == [v2] and active_version(ctx)["version"] == v2
    with pytest.raises(IntegrityError), ctx.engine.begin() as conn:
        conn.execute(update(model_versions).where(model_versions.c.version == v1).values(active=True))
    assert _active(ctx) == [v2]


def test_concurrent_activations_leave_exactly_one_active(make_ctx, backend):
    ctx = make_ctx(backend=backend)
    versions = [_register(ctx, 0.1 * i) for i in range(1, 5)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda v: activate(ctx, v), versions * 3))
    active = _active(ctx)
    assert len(active) == 1 and active[0] in versions


def test_migration_0008_keeps_the_newest_of_two_active_rows(make_ctx, backend):
    """A database from before 0008 may hold two active rows (the old bug): the newest stays."""
    ctx = make_ctx(backend=backend)
    v1, v2, v3 = _register(ctx, 0.5), _register(ctx, 0.6), _register(ctx, 0.7)
    with ctx.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0007")
    assert current_revision(ctx.engine) == "0007"
    assert "uq_model_versions_one_active" not in {i["name"] for i in inspect(ctx.engine).get_indexes("model_versions")}
    newest = utcnow() + dt.timedelta(hours=1)
    with ctx.engine.begin() as conn:
        conn.execute(update(model_versions).where(model_versions.c.version.in_([v1, v3])).values(active=True))
        conn.execute(update(model_versions).where(model_versions.c.version == v1).values(created_at=newest))
    assert _active(ctx) == [v1, v3]
    assert upgrade(ctx.engine) == head_revision() == "0008"
    assert _active(ctx) == [v1]  # the newest by created_at, not the greatest version name
    assert "uq_model_versions_one_active" in {i["name"] for i in inspect(ctx.engine).get_indexes("model_versions")}
    activate(ctx, v2)
    assert _active(ctx) == [v2]


def test_every_reader_of_the_active_model_agrees(make_ctx, backend):
    """The registry, the job API and the aggregation all read `registry.active_row`."""
    from pipeline.aggregate.mentions import active_model as aggregation_view
    from pipeline.detector.jobs import active_model as job_view

    ctx = make_ctx(backend=backend)
    with ctx.engine.connect() as conn:
        assert active_row(conn) is None and aggregation_view(conn).version is None
    assert job_view(ctx) is None
    v1 = _register(ctx, 0.5)
    activate(ctx, v1)
    with ctx.engine.connect() as conn:  # (one connection at a time: SQLite's BEGIN IMMEDIATE)
        seen = {active_row(conn)["version"], aggregation_view(conn).version}
    assert seen == {job_view(ctx)["version"]} == {v1}
