"""The catalog: one row per archived or quarantined object, keyed by its object key.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
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
        "instances",
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("sop_instance_uid", sa.String, nullable=False),
        sa.Column("sop_class_uid", sa.String, nullable=False),
        sa.Column("study_uid", sa.String, nullable=False),
        sa.Column("series_uid", sa.String, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String, nullable=False),
        sa.Column("transfer_syntax", sa.String, nullable=False),
        sa.Column("calling_aet", sa.String, nullable=False),
        sa.Column("receipt_id", sa.String, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("archived_at", sa.Float, nullable=True),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("reason", sa.String, nullable=True),
    )
    for column in ("sop_instance_uid", "study_uid", "series_uid", "calling_aet", "received_at"):
        op.create_index(f"ix_instances_{column}", "instances", [column])


def downgrade() -> None:
    op.drop_table("instances")
