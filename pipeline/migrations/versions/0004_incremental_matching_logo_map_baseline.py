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
  re-created from the copy below, frozen as they were at this revision (as 0002 does): the
  live ones in `pipeline.aggregate.views` may name columns a later revision adds, so a
  fresh `db upgrade` must never run them here.

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

# The views at this revision (frozen; new columns go at the end: Postgres can only append).
VIEWS = {
    "v_daily_trend": """
SELECT day, brand, product, platform, source,
       posts, images, unique_authors, reposts, expected_mentions,
       rolling_7, rolling_28, wow_change, zscore, spike, share_of_voice,
       model_version, computed_at, baseline
FROM mention_daily""",
    "v_share_of_voice": """
SELECT day, brand, platform, source, posts,
       SUM(posts) OVER (PARTITION BY day, platform, source) AS total_posts,
       share_of_voice,
       RANK() OVER (PARTITION BY day, platform, source ORDER BY posts DESC) AS brand_rank
FROM mention_daily
WHERE product = '*'""",
    "v_spikes": """
SELECT day, brand, product, platform, source, posts, baseline,
       posts - baseline AS excess, zscore, expected_mentions, model_version
FROM mention_daily
WHERE spike""",
}
COMMENTS = {
    "v_daily_trend": "Daily mentions per brand x product x platform x source with demand signals (see sql/README.md)",
    "v_share_of_voice": "Each brand share of all catalogue-brand mentions per day, platform and source",
    "v_spikes": "Days whose mentions are a spike: z-score >= 3 against the trailing 28 days and >= 5 posts",
}


def _revision_0002():
    """The 0002 migration module (its name starts with a digit: no plain import)."""
    return importlib.import_module("pipeline.migrations.versions.0002_views")


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

    conn = op.get_bind()
    _revision_0002().replace_views(conn, VIEWS, COMMENTS)  # v_spikes.baseline = the new column
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
    _revision_0002().create_views_0002(conn)
    op.drop_table("logo_class_map")
    op.drop_table("text_match_state")
