"""Notices: a permanent failure (the mail server refused the recipient, or
the message could not be built) is told apart from a notice given up after
retrying: ``outbox.failed_at``.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("failed_at", sa.DateTime()))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("failed_at")
