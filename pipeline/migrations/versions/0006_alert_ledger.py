"""The alert ledger: one row per (rule, day, key, destination), so an alert goes out once.

Revision ID: 0006
Revises: 0005

Re-running, backfilling or re-aggregating a day evaluates its alert rules again; the unique
key makes the second evaluation find the row and send nothing. See pipeline/alerts/ledger.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "alert_ledger",
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claim", sa.String(32), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_ledger")),
        sa.UniqueConstraint("rule", "day", "key", "destination", name=op.f("uq_alert_ledger_rule_day_key_destination")),
        sa.CheckConstraint("status in ('sending','sent','failed','skipped')", name=op.f("ck_alert_ledger_status")),
    )
    op.create_index(op.f("ix_alert_ledger_status"), "alert_ledger", ["status"])
    op.create_index(op.f("ix_alert_ledger_created_at"), "alert_ledger", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_alert_ledger_created_at", table_name="alert_ledger")
    op.drop_index("ix_alert_ledger_status", table_name="alert_ledger")
    op.drop_table("alert_ledger")
