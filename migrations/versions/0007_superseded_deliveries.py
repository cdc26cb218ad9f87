"""Deliveries may end "superseded": a sink that keeps an entity's current state (the crm sink)
is not sent an event whose lead or deal a newer event has changed since.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check,
        ADD CONSTRAINT deliveries_status_check
            CHECK (status IN ('pending', 'delivered', 'dead', 'superseded'));
    ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_outcome_check,
        ADD CONSTRAINT delivery_attempts_outcome_check
            CHECK (outcome IN ('delivered', 'retryable', 'permanent', 'superseded'));
    """)


def downgrade() -> None:
    # the older schema has no such ending: a superseded delivery was done with, as a delivered one
    op.execute("""
    UPDATE deliveries SET status = 'delivered' WHERE status = 'superseded';
    UPDATE delivery_attempts SET outcome = 'delivered' WHERE outcome = 'superseded';
    ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check,
        ADD CONSTRAINT deliveries_status_check
            CHECK (status IN ('pending', 'delivered', 'dead'));
    ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_outcome_check,
        ADD CONSTRAINT delivery_attempts_outcome_check
            CHECK (outcome IN ('delivered', 'retryable', 'permanent'));
    """)
