"""API tokens of the subscription API: created once, stored as a SHA-256 hash, revocable."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
from enum import Enum
from typing import Any

import psycopg
from psycopg.rows import dict_row

from config.inputs import whole_number

PREFIX = "lp_"
SHOWN = 8  # characters kept in clear (the `prefix` column) so a listed token can be recognised


class Check(Enum):
    """What a presented token turned out to be."""

    VALID = "valid"
    UNKNOWN = "unknown"
    REVOKED = "revoked"


def digest(token: str) -> str:
    """The stored form of a token: SHA-256, hex. A token is random enough not to need a salt."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def create(dsn: str, name: str) -> str:
    """Make a token named `name` and return it; this is the only time it can be seen."""
    name = name.strip()
    if not name:
        raise ValueError("a token needs a name (who or what will use it)")
    token = PREFIX + secrets.token_urlsafe(24)  # 24 random bytes: 32 URL-safe characters
    with _connect(dsn) as conn:
        conn.execute("INSERT INTO api_tokens (name, token_hash, prefix) VALUES (%s, %s, %s)",
                     (name, digest(token), token[:SHOWN]))
    return token


def list_tokens(dsn: str) -> list[dict[str, Any]]:
    """Every token, oldest first: id, name, prefix, created_at, last_used_at, revoked_at."""
    with _connect(dsn) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id, name, prefix, created_at, last_used_at, revoked_at "
                    "FROM api_tokens ORDER BY id")
        return cur.fetchall()


def revoke(dsn: str, token_id: int) -> bool:
    """Revoke a token at once; False when it was already revoked. LookupError when unknown."""
    with _connect(dsn) as conn:
        revoked = conn.execute("UPDATE api_tokens SET revoked_at = now() "
                               "WHERE id = %s AND revoked_at IS NULL RETURNING id",
                               (token_id,)).fetchone()
        if revoked is None and conn.execute("SELECT 1 FROM api_tokens WHERE id = %s",
                                            (token_id,)).fetchone() is None:
            raise LookupError(f"no API token with id {token_id} (see `leadpipe tokens list`)")
    return revoked is not None


def check(conn: psycopg.Connection, token: str | None) -> Check:
    """Is `token` a live API token? Records its use when it is.

    The lookup is by hash, so the secret itself is never compared; the final comparison of the
    stored and computed hashes is constant-time all the same."""
    if not token:
        return Check.UNKNOWN
    wanted = digest(token)
    row = conn.execute("SELECT id, token_hash, revoked_at FROM api_tokens WHERE token_hash = %s",
                       (wanted,)).fetchone()
    if row is None or not hmac.compare_digest(row[1], wanted):
        return Check.UNKNOWN
    if row[2] is not None:
        return Check.REVOKED
    conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = %s", (row[0],))
    return Check.VALID


# -- `leadpipe tokens ...` -------------------------------------------------------------------


def _dsn() -> str:
    from config.settings import ConfigError, Settings

    settings = Settings.from_env()
    if not settings.database_url:
        raise ConfigError("LEADPIPE_DATABASE_URL is not set")
    return settings.database_url


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def cmd_tokens(args: argparse.Namespace) -> int:
    dsn = _dsn()
    if args.action == "create":
        if not args.arg:
            raise ValueError("tokens create needs a NAME")
        token = create(dsn, args.arg)
        print(token)
        print("Shown once: store it now. Send it as `Authorization: Bearer <token>`.",
              file=sys.stderr)
        return 0
    if args.action == "list":
        rows = list_tokens(dsn)
        if not rows:
            print("no API tokens (create one with `leadpipe tokens create NAME`)")
        for r in rows:
            state = f"revoked {_when(r['revoked_at'])}" if r["revoked_at"] else "active"
            print(f"{r['id']:>4}  {r['name']:<24} {r['prefix']}...  "
                  f"created {_when(r['created_at'])}  last used {_when(r['last_used_at'])}  "
                  f"{state}")
        return 0
    if not args.arg:
        raise ValueError("tokens revoke needs a token ID (see `leadpipe tokens list`)")
    done = revoke(dsn, whole_number(args.arg, "A token ID (see `leadpipe tokens list`)"))
    print(f"token {args.arg}: {'revoked' if done else 'was already revoked'}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add `leadpipe tokens create NAME | list | revoke ID` to the `leadpipe` command."""
    tokens = subparsers.add_parser("tokens", help="API tokens of /integrations/webhooks")
    tokens.add_argument("action", choices=("create", "list", "revoke"))
    tokens.add_argument("arg", nargs="?", metavar="NAME|ID",
                        help="create: a name for the token; revoke: its id")
    tokens.set_defaults(func=cmd_tokens)
