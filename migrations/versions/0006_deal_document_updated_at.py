"""deals.document_updated_at: the deal document's own updated_at, which orders CRM events of one
second (event_timestamp has whole seconds, the document's updated_at milliseconds).

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL (rows stored before, deletes, documents without updated_at) ranks after every
    # event of the same event_timestamp that has one: see sinks.postgres.DEAL_ORDER
    op.execute("ALTER TABLE deals ADD COLUMN document_updated_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE deals DROP COLUMN document_updated_at")
