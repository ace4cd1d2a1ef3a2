"""demand_signal (forecasts of daily mentions) and its BI view v_forecast.

Revision ID: 0007
Revises: 0006

The aggregation stores each brand's forecast (expected posts per day ahead, 95% prediction
interval, backtest errors against the seasonal-naive baseline) here; BI tools read the latest
one per brand, joined with what actually happened, through `v_forecast` (its SQL frozen here
as it was at this revision, like 0002's and 0004's views: never the live
`pipeline.aggregate.views`, which may change after this revision).
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# v_forecast at this revision (frozen).
VIEWS = {
    "v_forecast": """
SELECT f.brand, f.product, f.platform, f.issued_on, f.day, f.horizon_days,
       f.expected, f.lower_95, f.upper_95, m.posts AS actual_posts,
       f.method, f.history_days, f.backtest_mae, f.baseline_mae, f.mase, f.beats_baseline, f.computed_at
FROM demand_signal f
LEFT JOIN mention_daily m
  ON m.day = f.day AND m.brand = f.brand AND m.product = f.product AND m.platform = f.platform
 AND m.source = 'any'
WHERE f.issued_on = (SELECT MAX(g.issued_on) FROM demand_signal g
                     WHERE g.brand = f.brand AND g.product = f.product AND g.platform = f.platform)""",
}
COMMENTS = {
    "v_forecast": "Latest forecast of daily mentions per brand with 95% prediction intervals and backtest errors",
}


def upgrade() -> None:
    op.create_table(
        "demand_signal",
        sa.Column("brand", sa.String(200), nullable=False),
        sa.Column("product", sa.String(200), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("issued_on", sa.Date(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("horizon_days", sa.Integer(), nullable=False),
        sa.Column("expected", sa.Float(), nullable=False),
        sa.Column("lower_95", sa.Float(), nullable=False),
        sa.Column("upper_95", sa.Float(), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("history_days", sa.Integer(), nullable=False),
        sa.Column("backtest_mae", sa.Float(), nullable=True),
        sa.Column("baseline_mae", sa.Float(), nullable=True),
        sa.Column("mase", sa.Float(), nullable=True),
        sa.Column("beats_baseline", sa.Boolean(), nullable=True),
        sa.Column("input_hash", sa.String(64), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("brand", "product", "platform", "issued_on", "day", name="pk_demand_signal"),
    )
    revision_0002 = importlib.import_module("pipeline.migrations.versions.0002_views")
    revision_0002.replace_views(op.get_bind(), VIEWS, COMMENTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_forecast")
    op.drop_table("demand_signal")
