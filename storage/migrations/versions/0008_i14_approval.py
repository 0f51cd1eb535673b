"""The console: the second pair of eyes (states draft and awaiting_approval,
who submitted and approved a release, a send-back comment, a force-approval's
reason), and the console's accounts and sessions.

Revision ID: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.alter_column("state", type_=sa.String(32), existing_type=sa.String(16),
                           existing_nullable=False)
        batch.add_column(sa.Column("submitted_by", sa.String(200)))
        batch.add_column(sa.Column("approved_by", sa.String(200)))
        batch.add_column(sa.Column("review_comment", sa.Text()))
        batch.add_column(sa.Column("forced_reason", sa.Text()))
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("must_change", sa.Boolean(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime()),
        sa.Column("disabled_at", sa.DateTime()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),  # SHA-256 of the cookie's token
        sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime()),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_web_sessions_user_id", "web_sessions")
    op.drop_table("web_sessions")
    op.drop_table("users")
    with op.batch_alter_table("releases") as batch:
        for column in ("forced_reason", "review_comment", "approved_by", "submitted_by"):
            batch.drop_column(column)
        batch.alter_column("state", type_=sa.String(16), existing_type=sa.String(32),
                           existing_nullable=False)
