"""The first schema: releases, documents, recipients, the outbox and the
audit chain.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("slug", sa.String(120), nullable=False, unique=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(320)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("instant", sa.DateTime(), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("wall", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(120), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("claimant", sa.String(120)),
        sa.Column("lease_expires_at", sa.DateTime()),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("published_at", sa.DateTime()),
        sa.Column("lateness_ms", sa.Float()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text()),
    )
    op.create_index("ix_releases_state", "releases", ["state"])
    op.create_index("ix_releases_instant", "releases", ["instant"])
    op.create_table(
        "documents",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("release_id", sa.String(40), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("organisation", sa.String(200)),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("published_at", sa.DateTime()),
        sa.Column("public_url", sa.Text()),
        sa.UniqueConstraint("release_id", "filename"),
    )
    op.create_index("ix_documents_release_id", "documents", ["release_id"])
    op.create_table(
        "recipients",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("release_id", sa.String(40), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("organisation", sa.String(200)),
        sa.UniqueConstraint("release_id", "email"),
    )
    op.create_index("ix_recipients_release_id", "recipients", ["release_id"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(200), nullable=False, unique=True),
        sa.Column("release_id", sa.String(40), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("recipient_id", sa.String(40), sa.ForeignKey("recipients.id")),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("to_addr", sa.String(320), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_by", sa.String(120)),
        sa.Column("claim_expires_at", sa.DateTime()),
        sa.Column("delivered_at", sa.DateTime()),
        sa.Column("delivered_to", sa.Text()),
        sa.Column("given_up_at", sa.DateTime()),
        sa.Column("last_error", sa.Text()),
    )
    op.create_index("ix_outbox_release_id", "outbox", ["release_id"])
    op.create_index("ix_outbox_not_before", "outbox", ["not_before"])
    op.create_index("ix_outbox_next_attempt_at", "outbox", ["next_attempt_at"])
    op.create_index("ix_outbox_delivered_at", "outbox", ["delivered_at"])
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("release_id", sa.String(40)),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_events_release_id", "audit_events", ["release_id"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_head", "audit_events", "outbox", "recipients", "documents",
                  "releases"):
        op.drop_table(table)
