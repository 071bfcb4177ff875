"""Studies, the outbox of their events, and each spool's watermark.

A row per study (open or stable, its revision), one per study event until it is delivered,
and each spool's watermark for the stability rule.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String, primary_key=True),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("last_archived_at", sa.Float, nullable=False),
        sa.Column("stabilised_at", sa.Float, nullable=True),
    )
    op.create_index("ix_studies_last_archived_at", "studies", ["last_archived_at"])
    op.create_table(
        "events",
        sa.Column("event_id", sa.String, primary_key=True),
        sa.Column("study_uid", sa.String, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("manifest_key", sa.String, nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("manifest_written_at", sa.Float, nullable=True),
        sa.Column("webhook_delivered_at", sa.Float, nullable=True),
        sa.Column("task_delivered_at", sa.Float, nullable=True),
        sa.Column("delivered_at", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("claimed_until", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_events_study_uid", "events", ["study_uid"])
    op.create_index("ix_events_delivered_at", "events", ["delivered_at"])
    op.create_table(
        "spools",
        sa.Column("spool_id", sa.String, primary_key=True),
        sa.Column("clear_before", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("spools")
    op.drop_table("events")
    op.drop_table("studies")
