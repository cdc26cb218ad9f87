"""email_sent.sink: the ledger is kept per e-mail sink, so a second sink sending to the same
recipient sends its own message instead of finding the first one's row and sending nothing.

Rows written before keep sink '' and count for every sink (what they meant then: no resend).

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE email_sent ADD COLUMN sink text NOT NULL DEFAULT '';
    ALTER TABLE email_sent DROP CONSTRAINT email_sent_pkey;
    ALTER TABLE email_sent ADD PRIMARY KEY (sink, dedup_key, recipient);
    CREATE INDEX email_sent_dedup_key ON email_sent (dedup_key);
    """)


def downgrade() -> None:
    op.execute("""
    DROP INDEX email_sent_dedup_key;
    DELETE FROM email_sent a USING email_sent b
     WHERE a.dedup_key = b.dedup_key AND a.recipient = b.recipient AND a.sink > b.sink;
    ALTER TABLE email_sent DROP CONSTRAINT email_sent_pkey;
    ALTER TABLE email_sent ADD PRIMARY KEY (dedup_key, recipient);
    ALTER TABLE email_sent DROP COLUMN sink;
    """)
