"""Pre-embargo copies: when they go, the copies issued, and the outbox's
``not_after`` so a copy is never delivered once the embargo has lifted.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("copies_at", sa.DateTime()))
        batch.add_column(sa.Column("copies_issued_at", sa.DateTime()))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("not_after", sa.DateTime()))
    op.create_table(
        "copies",
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("release_id", sa.String(40), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("recipient_id", sa.String(40), sa.ForeignKey("recipients.id"),
                  nullable=False),
        sa.Column("document_ids", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime()),
        sa.UniqueConstraint("release_id", "recipient_id"),
    )
    op.create_index("ix_copies_release_id", "copies", ["release_id"])


def downgrade() -> None:
    op.drop_table("copies")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("not_after")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("copies_issued_at")
        batch.drop_column("copies_at")
