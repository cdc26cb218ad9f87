"""Versioned schema migrations (Alembic), applied by `leadpipe migrate`."""
