"""subscriptions.failing_since: when a subscription's current run of failed deliveries began,
so it is suspended only after failing for LEADPIPE_SUBSCRIPTION_SUSPEND_AFTER_SECONDS too (a
receiver's short outage under steady traffic reached the count in minutes).

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE subscriptions ADD COLUMN failing_since timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions DROP COLUMN failing_since")
