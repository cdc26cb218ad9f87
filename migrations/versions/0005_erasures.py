"""erasures (who was erased and when, by hash) and events.purged_at (retention).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE erasures (
        id bigserial PRIMARY KEY,
        email_sha256 text NOT NULL,      -- of the lower-cased e-mail; the e-mail is not kept
        erased_at timestamptz NOT NULL DEFAULT now(),
        touched jsonb NOT NULL DEFAULT '{}'  -- rows (or entries) changed, per store
    );
    CREATE INDEX erasures_email ON erasures (email_sha256);

    -- when `leadpipe purge` emptied the raw body (LEADPIPE_RETAIN_PAYLOAD_DAYS)
    ALTER TABLE events ADD COLUMN purged_at timestamptz;
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE events DROP COLUMN purged_at; DROP TABLE erasures")
