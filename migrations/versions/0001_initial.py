"""events, leads, deals and quarantine.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE events (
        id text PRIMARY KEY,
        dedup_key text NOT NULL UNIQUE,
        source text NOT NULL,
        event_type text NOT NULL,
        entity_type text NOT NULL,
        entity_id text,
        occurred_at timestamptz NOT NULL,
        received_at timestamptz NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now(),
        duplicates integer NOT NULL DEFAULT 0,
        last_duplicate_at timestamptz,
        payload jsonb NOT NULL
    );
    CREATE INDEX events_entity ON events (entity_type, entity_id);
    CREATE INDEX events_received_at ON events (received_at);

    CREATE TABLE leads (
        lead_key text PRIMARY KEY,
        uuid text,
        legacy_id text,
        email text,
        name text,
        company text,
        job_title text,
        mobile_phone text,
        personal_phone text,
        city text,
        state text,
        website text,
        tags text[],
        lifecycle_stage text,
        opportunity boolean,
        fit text,
        interest bigint,
        owner_email text,
        number_conversions bigint,
        last_conversion_identifier text,
        last_conversion_at timestamptz,
        custom_fields jsonb,
        updated_at timestamptz NOT NULL,
        last_event_id text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX leads_uuid ON leads (uuid);
    CREATE INDEX leads_legacy_id ON leads (legacy_id);
    CREATE INDEX leads_email ON leads (email);

    CREATE TABLE deals (
        id text PRIMARY KEY,
        name text,
        status text,
        amount_monthly numeric,
        amount_unique numeric,
        amount_total numeric,
        rating bigint,
        stage_name text,
        pipeline_name text,
        source_name text,
        campaign_name text,
        owner_email text,
        custom_fields jsonb,
        prediction_date text,
        created_at timestamptz,
        closed_at timestamptz,
        deleted_at timestamptz,
        updated_at timestamptz NOT NULL,
        last_event_id text NOT NULL
    );

    CREATE TABLE quarantine (
        id text PRIMARY KEY,
        received_at timestamptz NOT NULL,
        quarantined_at timestamptz NOT NULL DEFAULT now(),
        reason text NOT NULL,
        event_type_hint text,
        payload jsonb NOT NULL,
        replays integer NOT NULL DEFAULT 0
    );
    CREATE INDEX quarantine_received_at ON quarantine (received_at);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE quarantine, deals, leads, events")
