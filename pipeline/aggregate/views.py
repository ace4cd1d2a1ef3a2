"""The stable BI views over `mention_daily` (one per question) and the indexes they need.

BI tools and the read-only role (`sql/readonly_role.sql`) read these views, never the base
tables, so the table can evolve while the views keep their names and columns. The SQL here
is the code's definition: `create_views(engine)` runs it on SQLite or Postgres, and
`python -m pipeline.aggregate.views > sql/views.sql` writes the same statements for DBAs (a
test checks that file is current). Migrations never import it: each revision that changes a
view holds a frozen copy of it (0002, 0004, 0007), so a later change here cannot break
`brandmon db upgrade` on a fresh database; a change here goes with a new revision holding
the new copy (a test checks that the views at head are these). Column meanings:
`sql/README.md`.
"""

from __future__ import annotations

import sys

from sqlalchemy import Connection, Engine, inspect, text

VIEWS: dict[str, str] = {
    # Q: how do mentions of a brand (product, platform, source) evolve day by day?
    # New columns go at the end: Postgres CREATE OR REPLACE VIEW can only append.
    "v_daily_trend": """
SELECT day, brand, product, platform, source,
       posts, images, unique_authors, reposts, expected_mentions,
       rolling_7, rolling_28, wow_change, zscore, spike, share_of_voice,
       model_version, computed_at, baseline
FROM mention_daily""",
    # Q: what share of all brand mentions does each brand get, per day/platform/source?
    "v_share_of_voice": """
SELECT day, brand, platform, source, posts,
       SUM(posts) OVER (PARTITION BY day, platform, source) AS total_posts,
       share_of_voice,
       RANK() OVER (PARTITION BY day, platform, source ORDER BY posts DESC) AS brand_rank
FROM mention_daily
WHERE product = '*'""",
    # Q: which days were unusual (z-score >= 3 against the 28 days before, >= 5 posts)?
    # `baseline` is the mean of those 28 days (the z-score's), not rolling_28 (which includes the day).
    "v_spikes": """
SELECT day, brand, product, platform, source, posts, baseline,
       posts - baseline AS excess, zscore, expected_mentions, model_version
FROM mention_daily
WHERE spike""",
}

# Views over tables later revisions add, keyed to that table: `create_views` makes them only
# once the table exists (revision 0007 creates `demand_signal` and `v_forecast`).
TABLE_VIEWS: dict[str, tuple[str, str]] = {
    # Q: how many mentions do we expect each day ahead (latest forecast per brand), and how did
    # the days already past turn out? One row per brand x product x platform x day ahead.
    "v_forecast": ("demand_signal", """
SELECT f.brand, f.product, f.platform, f.issued_on, f.day, f.horizon_days,
       f.expected, f.lower_95, f.upper_95, m.posts AS actual_posts,
       f.method, f.history_days, f.backtest_mae, f.baseline_mae, f.mase, f.beats_baseline, f.computed_at
FROM demand_signal f
LEFT JOIN mention_daily m
  ON m.day = f.day AND m.brand = f.brand AND m.product = f.product AND m.platform = f.platform
 AND m.source = 'any'
WHERE f.issued_on = (SELECT MAX(g.issued_on) FROM demand_signal g
                     WHERE g.brand = f.brand AND g.product = f.product AND g.platform = f.platform)"""),
}

# Indexes the views need beyond the primary key (day, ...) and ix_mention_daily_brand_day:
# v_spikes reads only the few spike rows. Also declared on the table in `pipeline.schema`
# (so the migrated schema matches the code); repeated here for DBAs who run sql/views.sql.
INDEXES: dict[str, str] = {
    "ix_mention_daily_spikes": "CREATE INDEX IF NOT EXISTS ix_mention_daily_spikes ON mention_daily (day) WHERE spike",
}

COMMENTS: dict[str, str] = {
    "v_daily_trend": "Daily mentions per brand x product x platform x source with demand signals (see sql/README.md)",
    "v_share_of_voice": "Each brand share of all catalogue-brand mentions per day, platform and source",
    "v_spikes": "Days whose mentions are a spike: z-score >= 3 against the trailing 28 days and >= 5 posts",
    "v_forecast": "Latest forecast of daily mentions per brand with 95% prediction intervals and backtest errors",
}


def statements(dialect: str, tables: set[str] | None = None) -> list[str]:
    """DDL for `dialect` ('sqlite' or 'postgresql'). Postgres replaces views in place so the
    read-only role keeps its grants; SQLite has no CREATE OR REPLACE, so drop + create.
    `tables`: the tables present (None: all), which decides the `TABLE_VIEWS` made."""
    out = []
    later = {n: body for n, (table, body) in TABLE_VIEWS.items() if tables is None or table in tables}
    for name, body in {**VIEWS, **later}.items():
        if dialect == "postgresql":
            out.append(f"CREATE OR REPLACE VIEW {name} AS{body}")
            comment = COMMENTS[name].replace("'", "''")
            out.append(f"COMMENT ON VIEW {name} IS '{comment}'")
        else:
            out.append(f"DROP VIEW IF EXISTS {name}")
            out.append(f"CREATE VIEW {name} AS{body}")
    out += list(INDEXES.values())
    return out


def create_views(engine: Engine | Connection) -> None:
    """Create or replace the BI views and their indexes (idempotent; safe in a migration)."""
    if isinstance(engine, Connection):
        _create(engine)
        return
    with engine.begin() as conn:
        _create(conn)


def _create(conn: Connection) -> None:
    tables = set(inspect(conn).get_table_names())
    for stmt in statements(conn.dialect.name, tables):
        conn.execute(text(stmt))


def drop_views(conn: Connection) -> None:
    for name in [*TABLE_VIEWS, *VIEWS]:
        conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
    for name in INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))


def views_sql() -> str:
    """The contents of sql/views.sql (Postgres dialect)."""
    head = (
        "-- BI views over mention_daily and demand_signal, and the indexes they need.\n"
        "-- GENERATED from pipeline/aggregate/views.py by `python -m pipeline.aggregate.views`;\n"
        "-- `brandmon db upgrade` already creates them. Column meanings: sql/README.md.\n"
    )
    return head + "".join(f"\n{s};\n" for s in statements("postgresql"))


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(views_sql())
