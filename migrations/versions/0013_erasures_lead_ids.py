"""erasures.lead_sha256: digests of the erased person's leads' uuids and legacy ids, so a body
on its way with one of them but a new address is dropped as theirs; and an index on leads by
lower-cased e-mail, which an erasure reads them by while storing waits for it.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE erasures ADD COLUMN lead_sha256 text[] NOT NULL DEFAULT '{}';
    CREATE INDEX leads_email_lower ON leads (lower(email));
    """)


def downgrade() -> None:
    op.execute("DROP INDEX leads_email_lower; ALTER TABLE erasures DROP COLUMN lead_sha256")
