"""Scheduler nodes: heartbeats and measured clock skew.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(120), primary_key=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("skew_ms", sa.Float()),
        sa.Column("clock_ok", sa.Boolean(), nullable=False),
        sa.Column("doing", sa.Text()),
        sa.Column("stopped_at", sa.DateTime()),
    )


def downgrade() -> None:
    op.drop_table("nodes")
