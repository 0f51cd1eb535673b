"""Publication under faults: when a release's current run of failed attempts
began (alerts repeat every ``alerts.repeat`` from it; cleared on success).

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("failing_since", sa.DateTime()))


def downgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("failing_since")
