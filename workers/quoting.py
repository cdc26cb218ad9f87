"""An erased address where rows kept for others quote it (a deal, another lead, an error text)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

ERASED_TEXT = "[erased]"

# The tables whose rows stay when a person is erased but may quote their address: another
# lead's owner or custom field, a deal's name, custom fields or owner, a sink's error text, the
# e-mail ledger's recipient. Each with the columns that find a row (its primary key) and those
# never rewritten (identifiers); every other text, text[] and jsonb column is.
TABLES = {
    "leads": (("lead_key",), ("lead_key", "last_event_id")),
    "deals": (("id",), ("id", "last_event_id")),
    "email_sent": (("sink", "dedup_key", "recipient"), ("sink", "dedup_key", "message_id")),
    "deliveries": (("event_id", "sink"), ("event_id", "sink", "status", "dispatch")),
    "delivery_attempts": (("id",), ("event_id", "sink", "outcome")),
    "dead_letters": (("id",), ("event_id", "sink")),
}
Column = tuple[str, str, bool]  # name, type (text, jsonb, _text), nullable


def rewrite_quotes(conn: psycopg.Connection, address: re.Pattern[str],
                   like: str) -> dict[str, int]:
    """In every row of TABLES whose text holds the address (`like`: a LIKE pattern for the
    lower-cased row, `address`: the whole address in lower-cased text), rewrite each string
    holding it: a column that is nothing but the address becomes NULL (where it may), else the
    address becomes "[erased]" inside its text, JSON keys and values included. Returns the rows
    rewritten per table, keyed "<table>_rewritten". Inside the caller's transaction."""
    columns: dict[str, list[Column]] = {table: [] for table in TABLES}
    for table, column, kind, nullable in conn.execute(
            "SELECT table_name, column_name, udt_name, is_nullable = 'YES' "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ANY(%s) AND udt_name IN ('text', 'jsonb', '_text') "
            "ORDER BY table_name, ordinal_position", (list(TABLES),)):
        if column not in TABLES[table][1]:
            columns[table].append((column, kind, nullable))
    return {f"{table}_rewritten": _rewrite_table(conn, table, TABLES[table][0], columns[table],
                                                 address, like) for table in TABLES}


def _rewrite_table(conn: psycopg.Connection, table: str, key: tuple[str, ...],
                   columns: list[Column], address: re.Pattern[str], like: str) -> int:
    if not columns:
        return 0
    ident = sql.Identifier(table)
    rows = conn.execute(sql.SQL(
        "SELECT {key}, {names} FROM {table} AS t WHERE lower(t::text) LIKE %s "
        "ORDER BY {key} FOR UPDATE").format(
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            names=sql.SQL(", ").join(sql.Identifier(c) for c, _, _ in columns), table=ident),
        (like,)).fetchall()
    update = sql.SQL("UPDATE {table} SET {sets} WHERE {where}").format(
        table=ident, sets=_each([c for c, _, _ in columns], ", "), where=_each(key, " AND "))
    changed = []
    for row in rows:
        found, values = list(row[:len(key)]), list(row[len(key):])
        new = [_rewritten(value, kind, nullable, address)
               for value, (_, kind, nullable) in zip(values, columns, strict=True)]
        if new != values:
            changed.append([Jsonb(v) if kind == "jsonb" and v is not None else v
                            for v, (_, kind, _) in zip(new, columns, strict=True)] + found)
    if changed:
        with conn.cursor() as cur:
            cur.executemany(update, changed)
    return len(changed)


def _each(names: Sequence[str], between: str) -> sql.Composed:
    """`a = %s, b = %s` (or joined by AND): one placeholder per column."""
    return sql.SQL(between).join(sql.SQL("{} = %s").format(sql.Identifier(n)) for n in names)


def _rewritten(value: Any, kind: str, nullable: bool, address: re.Pattern[str]) -> Any:
    if value is None:
        return None
    if kind == "text":
        if nullable and address.fullmatch(value.strip().lower()):
            return None  # an owner_email that was theirs: no owner now, not "[erased]"
        return _text(value, address)
    return json_rewritten(value, address)  # jsonb, or text[] (a list of strings)


def _text(text: str, address: re.Pattern[str]) -> str:
    if not address.search(text.lower()):
        return text
    # the address in any case; should lower() and IGNORECASE disagree on some letter, the
    # whole string goes rather than the address staying
    new = re.compile(address.pattern, re.IGNORECASE).sub(ERASED_TEXT, text)
    return ERASED_TEXT if address.search(new.lower()) else new


def json_rewritten(value: Any, address: re.Pattern[str]) -> Any:
    """A copy of a JSON value with every string in it (keys too) passed through _text; walked
    with a stack of its own, so a value nested as deep as JSON allows cannot exhaust Python's."""
    root = [value]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        item = holder[key]
        if isinstance(item, str):
            holder[key] = _text(item, address)
        elif isinstance(item, dict):
            copy = {_text(k, address): v for k, v in item.items()}
            holder[key] = copy
            stack.extend((copy, k) for k in copy)
        elif isinstance(item, list):
            copy = list(item)
            holder[key] = copy
            stack.extend((copy, i) for i in range(len(copy)))
    return root[0]
