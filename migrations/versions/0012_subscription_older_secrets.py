"""subscriptions.older_secrets: secrets rotated out before `previous_secret` whose grace has
not ended, so a second rotation within the grace keeps the first old secret signing too.

Each item is {"secret": "whsec_...", "expires_at": ISO-8601}; at most four are kept, the
latest to expire first.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE subscriptions ADD COLUMN older_secrets jsonb NOT NULL DEFAULT '[]'")


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions DROP COLUMN older_secrets")
