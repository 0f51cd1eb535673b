"""Rehearsals: each pre-flight rehearsal of a release and its result. An
automatic one is unique per (release, lead, instant), so two nodes, or a node
restarted, record (and mail) it once.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rehearsals",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("release_id", sa.String(40), sa.ForeignKey("releases.id"), nullable=False,
                  index=True),
        sa.Column("instant", sa.DateTime(), nullable=False),
        sa.Column("lead_seconds", sa.Integer()),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("checks", sa.Text(), nullable=False),
        sa.UniqueConstraint("release_id", "lead_seconds", "instant",
                            name="uq_rehearsals_release_lead_instant"),
    )


def downgrade() -> None:
    op.drop_table("rehearsals")
