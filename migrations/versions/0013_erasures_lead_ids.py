"""erasures.lead_sha256: digests of the erased person's leads' identifiers (uuid, legacy id,
current e-mail; workers.retention.erased_lead_digests), so a body on its way that would have
joined one of those leads is dropped as theirs though it carries a new address.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE erasures ADD COLUMN lead_sha256 text[] NOT NULL DEFAULT '{}'")


def downgrade() -> None:
    op.execute("ALTER TABLE erasures DROP COLUMN lead_sha256")
