"""deliveries.dispatch: which task a pending delivery belongs to.

NULL for the task that first queued it (and its following rounds); the relay, when it sends a
delivery whose task it takes for lost, names a new dispatch, and only the task carrying that
name delivers it. A task the relay took for lost that was only waiting in a long queue then
finds its deliveries gone to another and does nothing, instead of starting a second chain of
retries beside the relayed one.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE deliveries ADD COLUMN dispatch text")


def downgrade() -> None:
    op.execute("ALTER TABLE deliveries DROP COLUMN dispatch")
