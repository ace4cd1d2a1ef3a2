"""At most one active model: a partial unique index on model_versions(active) WHERE active.

Revision ID: 0008
Revises: 0007

Before this, "the active model" was a convention three readers interpreted differently (the
first row found, or the newest), and a database could hold two active rows. The upgrade keeps
the newest active row (latest `created_at`, then the greater version name: the one the
aggregation already counted, so no day needs restating) and deactivates the others, then adds
the index; from here on a second active row is an IntegrityError on both backends (Postgres
and SQLite both have partial indexes). Frozen SQL: no application code is imported.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEX = "uq_model_versions_one_active"
log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    conn = op.get_bind()
    active = [v for (v,) in conn.execute(sa.text(
        "SELECT version FROM model_versions WHERE active = :on ORDER BY created_at DESC, version DESC"
    ).bindparams(on=True))]
    if len(active) > 1:
        log.warning("model_versions: %d active rows; keeping the newest (%s) active, deactivating %s",
                    len(active), active[0], ", ".join(active[1:]))
        conn.execute(
            sa.text("UPDATE model_versions SET active = :off WHERE version IN :others")
            .bindparams(sa.bindparam("others", expanding=True), off=False),
            {"others": active[1:]},
        )
    op.create_index(INDEX, "model_versions", ["active"], unique=True,
                    postgresql_where=sa.text("active"), sqlite_where=sa.text("active"))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="model_versions")
