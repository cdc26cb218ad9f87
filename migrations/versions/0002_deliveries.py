"""deliveries (the outbox), delivery_attempts, dead_letters and email_sent.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE deliveries (
        event_id text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
        sink text NOT NULL,
        status text NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        dispatched_at timestamptz NOT NULL DEFAULT now(),
        delivered_at timestamptz,
        last_error text,
        PRIMARY KEY (event_id, sink)
    );
    CREATE INDEX deliveries_pending ON deliveries (sink, dispatched_at)
        WHERE status = 'pending';

    CREATE TABLE delivery_attempts (
        id bigserial PRIMARY KEY,
        event_id text NOT NULL,
        sink text NOT NULL,
        attempt integer NOT NULL,
        started_at timestamptz NOT NULL,
        duration_ms double precision NOT NULL,
        outcome text NOT NULL CHECK (outcome IN ('delivered', 'retryable', 'permanent')),
        status_code integer,
        error text
    );
    CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id, sink);

    CREATE TABLE dead_letters (
        id bigserial PRIMARY KEY,
        event_id text NOT NULL,
        sink text NOT NULL,
        error text NOT NULL,
        status_code integer,
        attempts integer NOT NULL,
        first_attempt_at timestamptz,
        last_attempt_at timestamptz,
        dead_at timestamptz NOT NULL DEFAULT now(),
        replayed_at timestamptz
    );
    CREATE INDEX dead_letters_open ON dead_letters (sink, dead_at) WHERE replayed_at IS NULL;

    CREATE TABLE email_sent (
        dedup_key text NOT NULL,
        recipient text NOT NULL,
        message_id text NOT NULL,
        sent_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (dedup_key, recipient)
    );
    """)


def downgrade() -> None:
    op.execute("DROP TABLE email_sent, dead_letters, delivery_attempts, deliveries")
