"""api_tokens and subscriptions (the RD-compatible /integrations/webhooks API).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE api_tokens (
        id bigserial PRIMARY KEY,
        name text NOT NULL,
        token_hash text NOT NULL UNIQUE,  -- sha256 hex of the token; the token itself is not kept
        prefix text NOT NULL,             -- its first 8 characters, to recognise it in a list
        created_at timestamptz NOT NULL DEFAULT now(),
        last_used_at timestamptz,
        revoked_at timestamptz
    );

    CREATE TABLE subscriptions (
        uuid uuid PRIMARY KEY,
        event_type text NOT NULL,
        entity_type text NOT NULL,
        url text NOT NULL,
        http_method text NOT NULL,
        event_identifiers text[] NOT NULL DEFAULT '{}',
        include_relations text[] NOT NULL DEFAULT '{}',
        status text NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'suspended', 'inactive')),
        source text NOT NULL CHECK (source IN ('MKT', 'CRM')),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        secret text NOT NULL,             -- Standard Webhooks signing secret, "whsec_..."
        previous_secret text,             -- still accepted until previous_secret_expires_at
        previous_secret_expires_at timestamptz,
        consecutive_failures integer NOT NULL DEFAULT 0,
        UNIQUE (event_type, url)
    );
    """)


def downgrade() -> None:
    op.execute("DROP TABLE subscriptions, api_tokens")
