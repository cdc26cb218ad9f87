"""subscriptions.url_key: the URL as the endpoint it reaches (ingest.ssrf.endpoint_key), unique
per event type (by its md5), so HTTPS://Host:443/rd and https://host/rd#x are one
subscription, not two that each get every event.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from ingest.ssrf import Refused, endpoint_key

    op.execute("ALTER TABLE subscriptions ADD COLUMN url_key text")
    bind = op.get_bind()
    seen: set[tuple[str, str]] = set()
    for uuid, event_type, url in bind.exec_driver_sql(
            "SELECT uuid, event_type, url FROM subscriptions ORDER BY created_at, uuid").all():
        try:
            key = endpoint_key(url)
        except (Refused, ValueError):  # stored before today's checks: its text is its key
            key = url
        if (event_type, key) in seen:  # made before this check: kept, and told apart by uuid
            key = f"{key}#{uuid}"
        seen.add((event_type, key))
        bind.exec_driver_sql("UPDATE subscriptions SET url_key = %s WHERE uuid = %s",
                             (key, uuid))
    # unique by a digest: a long non-ASCII URL, percent-encoded in its key, can pass the 2.7 kB
    # a btree entry holds. The key's uniqueness covers the URL's, whose own constraint had the
    # same limit (a URL of 900 CJK characters could not be stored).
    op.execute("""
    ALTER TABLE subscriptions ALTER COLUMN url_key SET NOT NULL,
        DROP CONSTRAINT subscriptions_event_type_url_key;
    CREATE UNIQUE INDEX subscriptions_endpoint ON subscriptions (event_type, md5(url_key));
    """)


def downgrade() -> None:
    op.execute("""
    DROP INDEX subscriptions_endpoint;
    ALTER TABLE subscriptions DROP COLUMN url_key,
        ADD CONSTRAINT subscriptions_event_type_url_key UNIQUE (event_type, url)
    """)
