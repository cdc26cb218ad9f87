"""An erased address where rows kept for others quote it (a deal, another lead, an error text)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

ERASED_TEXT = "[erased]"

# The tables whose rows stay when a person is erased but may quote their address: another
# lead's owner or custom field, a deal's name, custom fields or owner, a sink's error text.
# Each with the columns that find a row (its primary key) and those never rewritten
# (identifiers); every other text, text[] and jsonb column is. In the order their rows are
# locked: leads as batches lock them (sinks.postgres), dead letters before deliveries as a
# replay does (workers.operations.replay), so the erasure waits for those, never in a cycle.
TABLES = {
    "leads": (("lead_key",), ("lead_key", "last_event_id")),
    "deals": (("id",), ("id", "last_event_id")),
    "dead_letters": (("id",), ("event_id", "sink")),
    "deliveries": (("event_id", "sink"), ("event_id", "sink", "status", "dispatch")),
    "delivery_attempts": (("id",), ("event_id", "sink", "outcome")),
}
OF_EVENTS = ("dead_letters", "deliveries", "delivery_attempts")  # rows kept per event
Column = tuple[str, str, bool]  # name, type (text, jsonb, _text), nullable
Holds = Callable[[Any], bool]  # whether a JSON value (a row as to_jsonb gives it) names them


def quoting(conn: psycopg.Connection, table: str, like: str, holds: Holds) -> list[tuple]:
    """The keys of the rows of `table` that name the person (`like`: a LIKE pattern for the
    lower-cased row text, which finds candidates; `holds` decides), read without locking:
    a row another address merely resembles (`joana@` for `ana@`) is never locked."""
    key = TABLES[table][0]
    return [tuple(row[:-1]) for row in conn.execute(sql.SQL(
        "SELECT {key}, to_jsonb(t) FROM {table} AS t WHERE lower(t::text) LIKE %s").format(
            key=_names(key), table=sql.Identifier(table)), (like,)) if holds(row[-1])]


def find_and_lock(conn: psycopg.Connection, like: str, holds: Holds,
                  events: Sequence[str]) -> dict[str, list[tuple]]:
    """The rows of TABLES but leads (the caller locks those with the person's) that name the
    person, {table: keys} (`quoting`); each table's rows the erasure changes — these, and the
    person's own ones deleted (those of the `events` erased) — locked in one statement, in
    key order, table after table in TABLES' order: a replay or another erasure locking some
    of them waits for this one or makes it wait, never both."""
    found: dict[str, list[tuple]] = {}
    for table in list(TABLES)[1:]:
        found[table] = keys = quoting(conn, table, like, holds)
        key = TABLES[table][0]
        params: list[Any] = [[str(k[n]) for k in keys] for n in range(len(key))]
        theirs = sql.SQL("")
        if table in OF_EVENTS:
            theirs = sql.SQL(" OR event_id = ANY(%s)")
            params.append(list(events))
        conn.execute(sql.SQL("SELECT 1 FROM {table} WHERE {match}{theirs} "
                             "ORDER BY {key} FOR UPDATE").format(
            table=sql.Identifier(table), match=_match(key), theirs=theirs, key=_names(key)),
            params).fetchall()
    return found


def rewrite_quotes(conn: psycopg.Connection, address: re.Pattern[str],
                   found: dict[str, Sequence[tuple]]) -> dict[str, int]:
    """In the rows found (and locked) that name the person, {table: keys}, rewrite each string
    holding the address (`address`: the whole address in lower-cased text): a column that is
    nothing but the address becomes NULL (where it may), else the address becomes "[erased]"
    inside its text, JSON keys and values included. Returns the rows rewritten per table,
    keyed "<table>_rewritten". Inside the caller's transaction."""
    columns: dict[str, list[Column]] = {table: [] for table in TABLES}
    for table, column, kind, nullable in conn.execute(
            "SELECT table_name, column_name, udt_name, is_nullable = 'YES' "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ANY(%s) AND udt_name IN ('text', 'jsonb', '_text') "
            "ORDER BY table_name, ordinal_position", (list(TABLES),)):
        if column not in TABLES[table][1]:
            columns[table].append((column, kind, nullable))
    return {f"{table}_rewritten": _rewrite_rows(conn, table, found.get(table, ()),
                                                columns[table], address) for table in TABLES}


def _rewrite_rows(conn: psycopg.Connection, table: str, keys: Sequence[tuple],
                  columns: list[Column], address: re.Pattern[str]) -> int:
    if not keys or not columns:
        return 0
    key = TABLES[table][0]
    ident = sql.Identifier(table)
    # read as they are now (locked since they were found; a row deleted since is not here)
    rows = conn.execute(sql.SQL(
        "SELECT {key}, {names} FROM {table} WHERE {match} ORDER BY {key} FOR UPDATE").format(
            key=_names(key), names=_names([c for c, _, _ in columns]), table=ident,
            match=_match(key)),
        [[str(k[n]) for k in keys] for n in range(len(key))]).fetchall()
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


def _match(key: Sequence[str]) -> sql.Composed:
    """`(k1::text, k2::text) IN (SELECT * FROM unnest(%s::text[], %s::text[]))`: one array of
    each key column's values, as text."""
    return sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key),
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in key))


def _names(names: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, names))


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
