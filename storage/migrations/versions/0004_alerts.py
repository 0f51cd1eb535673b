"""Alerts: an outbox row may carry the facts of its message (an alert's
subject and lines), since an alert is not rebuilt from a release's records.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("details", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("details")
