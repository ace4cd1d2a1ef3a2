"""Quarantine rows keyed on the whole window (start and end), not on its start alone.

Revision ID: 0005
Revises: 0004

Two windows with the same start and different ends (`brandmon ingest --start/--end` beside a
daily backfill) shared their quarantine rows, so the loader had to look in the run log before
deleting a row that might be the other window's. With `window_end` in the key each window owns
its rows and replaces exactly them. Existing rows take the end of the succeeded ingest run of
their window (the longest, if several shared the start); index-time rows (no window) keep NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_KEY = "uq_quarantine_source_window_start_kind_record_ref"
NEW_KEY = "uq_quarantine_source_window_start_window_end_kind_record_ref"


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as batch:
        batch.add_column(sa.Column("window_end", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(OLD_KEY, type_="unique")
        batch.create_unique_constraint(NEW_KEY, ["source", "window_start", "window_end", "kind", "record_ref"])
    op.execute(
        "UPDATE quarantine SET window_end = (SELECT MAX(r.window_end) FROM runs r WHERE r.kind = 'ingest'"
        " AND r.source = quarantine.source AND r.window_start = quarantine.window_start AND r.status = 'succeeded')"
        " WHERE window_start IS NOT NULL"
    )


def downgrade() -> None:
    # Rows of windows that shared a start collapse back to one per (start, reference).
    op.execute(
        "DELETE FROM quarantine WHERE id NOT IN (SELECT MIN(id) FROM quarantine"
        " GROUP BY source, window_start, kind, record_ref)"
    )
    with op.batch_alter_table("quarantine") as batch:
        batch.drop_constraint(NEW_KEY, type_="unique")
        batch.create_unique_constraint(OLD_KEY, ["source", "window_start", "kind", "record_ref"])
        batch.drop_column("window_end")
