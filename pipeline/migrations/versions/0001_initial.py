"""Initial schema: catalogue, sources, posts, images, detector, mentions, aggregates, run log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

from pipeline.schema import metadata  # pre-release baseline: frozen into explicit ops at 1.0

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
