"""Alembic environment: runs the SQL migrations against the connection `leadpipe migrate` gives."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
