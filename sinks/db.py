"""Postgres connections and `leadpipe migrate`."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

import migrations

log = logging.getLogger("leadpipe.db")
MIGRATIONS = Path(migrations.__file__).resolve().parent


# How long opening a connection may take: a server that accepts and then answers nothing
# (frozen, stopped, a half-open proxy) would otherwise hold the caller for good.
CONNECT_TIMEOUT = 5


def connect(dsn: str, **kwargs: object) -> psycopg.Connection:
    """A connection of its own (a command, an operator request), given up after
    CONNECT_TIMEOUT seconds instead of waiting on a server that does not answer."""
    return psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, **kwargs)  # type: ignore[arg-type]


def make_pool(dsn: str, max_size: int = 4, timeout: float = 5.0,
              autocommit: bool = False) -> ConnectionPool:
    """A small pool per process, made on first use (never at import or before a fork).

    A caller waits at most `timeout` seconds for a connection (PoolTimeout), so a database
    that is down makes a retryable error, not a stuck worker. `autocommit` is fixed here, before
    the pool opens its first connection."""
    return ConnectionPool(dsn, min_size=1, max_size=max_size, open=True, timeout=timeout,
                          kwargs={"autocommit": autocommit,
                                  "connect_timeout": max(1, int(timeout))},
                          configure=_keepalive, name="leadpipe")


# A worker's session holds advisory locks (a delivery's, a lead's or deal's turn). If its host
# dies or drops off the network, the server keeps the session, and the locks, until TCP tells
# it so: after some 2 h 11 min with Linux's defaults, a minute and a half with these.
KEEPALIVE = {"tcp_keepalives_idle": 60, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 3}


def _keepalive(conn: psycopg.Connection) -> None:
    """Each new pooled session: the server probes our end of it (ignored over a Unix socket)."""
    try:
        for name, value in KEEPALIVE.items():
            conn.execute(f"SET {name} = {int(value)}")
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:  # a proxy that refuses them: the system's defaults stand
        log.warning("TCP keepalive settings refused (%s); a dead worker's locks are freed "
                    "only when the server's own TCP keepalive notices", type(exc).__name__)
        if not conn.autocommit:
            conn.rollback()
        return
    if not conn.autocommit:
        conn.commit()


def _alembic_config(connection: psycopg.Connection | None = None):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _sqlalchemy_url(dsn: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix):]
    return dsn


def migrate(dsn: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default); safe to run again."""
    import sqlalchemy
    from alembic import command

    engine = sqlalchemy.create_engine(_sqlalchemy_url(dsn), poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
    engine.dispose()


@functools.cache
def code_head() -> str:
    """The newest migration this code knows (read from its scripts once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(dsn: str) -> tuple[str | None, str]:
    """(revision the database is at, newest revision the code knows)."""
    head = code_head()
    with psycopg.connect(dsn, connect_timeout=3) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.errors.UndefinedTable:
            return None, head
    return (row[0] if row else None), head
