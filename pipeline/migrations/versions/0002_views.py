"""BI views over mention_daily (v_daily_trend, v_share_of_voice, v_spikes) and their index.

Revision ID: 0002
Revises: 0001

The view SQL lives in `pipeline.aggregate.views` (also rendered to `sql/views.sql`); this
revision runs it. A later change to the views needs a new revision calling `create_views`
again (Postgres `CREATE OR REPLACE VIEW` keeps the read-only role's grants, but can only
append columns: renaming or dropping one needs a drop + create and re-running
`sql/readonly_role.sql`).
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from pipeline.aggregate.views import create_views

    create_views(op.get_bind())


def downgrade() -> None:
    from pipeline.aggregate.views import drop_views

    drop_views(op.get_bind())
