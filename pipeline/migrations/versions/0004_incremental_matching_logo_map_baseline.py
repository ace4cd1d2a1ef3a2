"""Incremental text matching, the logo-class map, and the z-score baseline on mention_daily.

Revision ID: 0004
Revises: 0003

* `text_match_state`: per post, the `content_hash` and catalogue fingerprint its
  `text_mentions` were matched from, so recomputing a day matches only new, edited or
  never-matched posts (a catalogue change re-matches them all).
* `logo_class_map`: detector class name -> catalogue brand/product, so image mentions join
  on a normalised class name instead of the exact brand name.
* `mention_daily.baseline`: the trailing 28-day mean the z-score compares to (the BI view
  `v_spikes` showed `rolling_28`, which includes the spike day itself); the views are
  re-created from `pipeline.aggregate.views`.

Signals now treat days without rows as zero (a dense calendar), so every aggregated day is
marked dirty: the next `brandmon aggregate` restates them (and fills `baseline`).
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

VIEW_NAMES = ("v_daily_trend", "v_share_of_voice", "v_spikes")


def upgrade() -> None:
    op.create_table(
        "text_match_state",
        sa.Column("post_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("catalogue", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["post_id"], ["posts.id"], name=op.f("fk_text_match_state_post_id_posts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("post_id", name=op.f("pk_text_match_state")),
    )
    op.create_table(
        "logo_class_map",
        sa.Column("class_name", sa.String(length=200), nullable=False),
        sa.Column("brand", sa.String(length=200), nullable=False),
        sa.Column("product", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("class_name", "brand", "product", name=op.f("pk_logo_class_map")),
    )
    op.add_column("mention_daily", sa.Column("baseline", sa.Float(), nullable=True))

    from pipeline.aggregate.views import create_views

    conn = op.get_bind()
    create_views(conn)  # v_spikes.baseline = the new column; v_daily_trend appends it
    conn.execute(
        sa.text(
            "INSERT INTO dirty_days (day, reason, marked_at) "
            "SELECT DISTINCT day, 'migration 0004', CURRENT_TIMESTAMP FROM mention_daily WHERE TRUE "
            "ON CONFLICT (day) DO NOTHING"
        )
    )


def downgrade() -> None:
    conn = op.get_bind()
    # Postgres cannot drop a view's column in place: drop and re-create the 0002 views (re-run
    # sql/readonly_role.sql afterwards to restore the read-only role's grants).
    for name in VIEW_NAMES:
        conn.execute(sa.text(f"DROP VIEW IF EXISTS {name}"))
    conn.execute(sa.text("ALTER TABLE mention_daily DROP COLUMN baseline"))  # SQLite >= 3.35
    importlib.import_module("pipeline.migrations.versions.0002_views").create_views_0002(conn)
    op.drop_table("logo_class_map")
    op.drop_table("text_match_state")
