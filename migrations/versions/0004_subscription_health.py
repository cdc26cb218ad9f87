"""subscriptions.suspended_at and last_error: why and when a subscription stopped receiving.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE subscriptions
        ADD COLUMN suspended_at timestamptz,
        ADD COLUMN last_error text;
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions DROP COLUMN suspended_at, DROP COLUMN last_error")
