"""Drop ix_posts_source_posted_at: ix_posts_posted_at serves every query that used it.

Revision ID: 0003
Revises: 0002

Each index on `posts` costs every upserted post: this one took 1-2 us of Postgres CPU per post
in `bench/ingest.py` and only ever helped `images.pending_rows`, whose window filter on
`posted_at` the single-column index answers just as well.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_posts_source_posted_at", table_name="posts")


def downgrade() -> None:
    op.create_index("ix_posts_source_posted_at", "posts", ["source", "posted_at"], unique=False)
