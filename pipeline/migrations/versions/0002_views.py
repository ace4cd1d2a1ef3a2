"""BI views over mention_daily (v_daily_trend, v_share_of_voice, v_spikes) and their index.

Revision ID: 0002
Revises: 0001

The views as they were at this revision, frozen here (the live definitions are in
`pipeline.aggregate.views`, which later revisions such as 0004 apply): the code's views may
name columns a later revision adds, so this revision must not run them. Postgres
`CREATE OR REPLACE VIEW` keeps the read-only role's grants, but can only append columns:
renaming or dropping one needs a drop + create and re-running `sql/readonly_role.sql`.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = {
    "v_daily_trend": """
SELECT day, brand, product, platform, source,
       posts, images, unique_authors, reposts, expected_mentions,
       rolling_7, rolling_28, wow_change, zscore, spike, share_of_voice,
       model_version, computed_at
FROM mention_daily""",
    "v_share_of_voice": """
SELECT day, brand, platform, source, posts,
       SUM(posts) OVER (PARTITION BY day, platform, source) AS total_posts,
       share_of_voice,
       RANK() OVER (PARTITION BY day, platform, source ORDER BY posts DESC) AS brand_rank
FROM mention_daily
WHERE product = '*'""",
    "v_spikes": """
SELECT day, brand, product, platform, source, posts, rolling_28 AS baseline,
       posts - rolling_28 AS excess, zscore, expected_mentions, model_version
FROM mention_daily
WHERE spike""",
}
COMMENTS = {
    "v_daily_trend": "Daily mentions per brand x product x platform x source with demand signals (see sql/README.md)",
    "v_share_of_voice": "Each brand share of all catalogue-brand mentions per day, platform and source",
    "v_spikes": "Days whose mentions are a spike: z-score >= 3 against the trailing 28 days and >= 5 posts",
}
INDEX = "CREATE INDEX IF NOT EXISTS ix_mention_daily_spikes ON mention_daily (day) WHERE spike"


def replace_views(conn, views: dict[str, str], comments: dict[str, str]) -> None:
    """Create or replace `views` (name -> SELECT): in place on Postgres, so the read-only role
    keeps its grants; SQLite has no CREATE OR REPLACE, so drop + create. Later revisions pass
    their own frozen copies (0004, 0007)."""
    for name, body in views.items():
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"CREATE OR REPLACE VIEW {name} AS{body}"))
            comment = comments[name].replace("'", "''")
            conn.execute(text(f"COMMENT ON VIEW {name} IS '{comment}'"))
        else:
            conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
            conn.execute(text(f"CREATE VIEW {name} AS{body}"))


def create_views_0002(conn) -> None:
    """This revision's views (also what revision 0004's downgrade restores)."""
    replace_views(conn, VIEWS, COMMENTS)
    conn.execute(text(INDEX))


def upgrade() -> None:
    create_views_0002(op.get_bind())


def downgrade() -> None:
    conn = op.get_bind()
    for name in VIEWS:
        conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
    # ix_mention_daily_spikes stays: revision 0001 made it (0002 only ensures it) and drops it
