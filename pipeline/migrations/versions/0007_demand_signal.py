"""demand_signal (forecasts of daily mentions) and its BI view v_forecast.

Revision ID: 0007
Revises: 0006

The aggregation stores each brand's forecast (expected posts per day ahead, 95% prediction
interval, backtest errors against the seasonal-naive baseline) here; BI tools read the latest
one per brand, joined with what actually happened, through `v_forecast`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pipeline.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


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
        sa.Column("computed_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("brand", "product", "platform", "issued_on", "day", name="pk_demand_signal"),
    )
    from pipeline.aggregate.views import create_views

    create_views(op.get_bind())  # now that demand_signal exists, v_forecast too


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_forecast")
    op.drop_table("demand_signal")
