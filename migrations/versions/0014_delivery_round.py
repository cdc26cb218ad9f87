"""deliveries.round: the retry round a pending delivery is in (written when its next task is
scheduled), so the relay sends a delivery whose task was lost on in that round, not from the
first one again.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE deliveries ADD COLUMN round integer NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE deliveries DROP COLUMN round")
