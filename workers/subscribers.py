"""Subscriptions as delivery targets: which events they get, their webhook sink, their health."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from config.settings import Settings
from workers.events import Event
from workers.routing import SinkSpec
from workers.view import identifier

log = logging.getLogger("leadpipe.subscribers")

PREFIX = "subscription:"  # deliveries.sink of a subscription is "subscription:<uuid>"
CONVERTED = "WEBHOOK.CONVERTED"

Matcher = Callable[[Event], list[str]]


def target(uuid: Any) -> str:
    """The delivery target name (deliveries.sink, dead_letters.sink) of a subscription."""
    return f"{PREFIX}{uuid}"


def is_target(name: str) -> bool:
    return name.startswith(PREFIX)


def matcher(conn: psycopg.Connection) -> Matcher:
    """Which subscriptions an event goes to, from one read of the table.

    An event goes to every subscription of its type (suspended ones too: their deliveries go
    to dead letters, to be replayed after a PUT re-activates them); a WEBHOOK.CONVERTED
    subscription with `event_identifiers` only gets conversions with one of them.
    """
    by_type: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for uuid, event_type, identifiers in conn.execute(
            "SELECT uuid, event_type, event_identifiers FROM subscriptions "
            "WHERE status <> 'inactive' ORDER BY created_at, uuid"):
        by_type.setdefault(event_type, []).append((target(uuid), frozenset(identifiers)))
    if not by_type:
        return lambda event: []

    def match(event: Event) -> list[str]:
        return [name for name, wanted in by_type.get(event.event_type, ())
                if takes(event.event_type, wanted, event)]

    return match


def takes(event_type: str, identifiers: frozenset[str], event: Event) -> bool:
    """Whether a subscription to `event_type` with these `event_identifiers` gets `event`."""
    if event.event_type != event_type:
        return False
    return not identifiers or event_type != CONVERTED or identifier(event) in identifiers


@dataclass(frozen=True)
class Subscription:
    """The row a delivery needs."""

    uuid: str
    event_type: str
    url: str
    include_relations: tuple[str, ...]
    status: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: Any
    older_secrets: tuple[dict[str, Any], ...] = ()  # {"secret", "expires_at"}, still in grace
    event_identifiers: frozenset[str] = frozenset()

    @property
    def target(self) -> str:
        return target(self.uuid)

    def refuses(self, event: Event) -> str | None:
        """Why a pending delivery is no longer this subscription's (a PUT changed its event
        type or identifiers after the event was routed to it), or None."""
        if takes(self.event_type, self.event_identifiers, event):
            return None
        wants = self.event_type + (f" with event_identifiers {sorted(self.event_identifiers)}"
                                   if self.event_identifiers and self.event_type == CONVERTED
                                   else "")
        return f"no longer subscribed: the subscription takes {wants} since it was changed"

    def options(self, settings: Settings) -> dict[str, Any]:
        """Options of the webhook sink that delivers to this subscription."""
        return {"url": self.url, "secret": self.secret, "timeout": 5.0, "headers": {},
                "body": "rd", "include_relations": list(self.include_relations),
                "previous_secret": self.previous_secret,
                "previous_secret_expires_at": self.previous_secret_expires_at,
                "older_secrets": [{"secret": o["secret"],
                                   "expires_at": datetime.fromisoformat(o["expires_at"])}
                                  for o in self.older_secrets],
                "ssrf_allow": list(settings.ssrf_allow), "retry_any_status": True}


def load(conn: psycopg.Connection, name: str) -> Subscription | None:
    """The subscription behind a target name, or None when it was deleted."""
    row = conn.execute(
        "SELECT uuid::text, event_type, url, include_relations, status, secret, "
        "previous_secret, previous_secret_expires_at, older_secrets, event_identifiers "
        "FROM subscriptions WHERE uuid::text = %s", (name[len(PREFIX):],)).fetchone()
    if row is None:
        return None
    return Subscription(row[0], row[1], row[2], tuple(row[3]), *row[4:8], tuple(row[8]),
                        frozenset(row[9]))


def spec(name: str) -> SinkSpec:
    """The delivery policy of every subscription: RD's 5 s answer limit and its rule that any
    other answer is a failure to try again; one try per round, in Leadpipe's rounds (7 tries
    over about 8.6 hours, then a dead letter that can be replayed)."""
    return SinkSpec(name, "webhook", {}, quick_retries=1)


class Health:
    """Counts a subscription's consecutive failed deliveries and how long it has been failing;
    suspends it once both reach their thresholds."""

    def __init__(self, subscription: Subscription, threshold: int, min_seconds: int = 0):
        self.uuid = subscription.uuid
        self.threshold = threshold
        self.min_seconds = min_seconds

    def succeeded(self, conn: psycopg.Connection) -> None:
        conn.execute("UPDATE subscriptions SET consecutive_failures = 0, failing_since = NULL "
                     "WHERE uuid::text = %s AND (consecutive_failures <> 0 "
                     "OR failing_since IS NOT NULL)", (self.uuid,))

    def failed(self, conn: psycopg.Connection, exc: BaseException) -> str | None:
        """Record one failed delivery; the suspension reason once the thresholds are reached."""
        # every expression of SET reads the row as it was before this UPDATE
        due = ("status = 'active' AND consecutive_failures + 1 >= %(n)s "
               "AND now() - COALESCE(failing_since, now()) >= make_interval(secs => %(s)s)")
        row = conn.execute(
            "UPDATE subscriptions SET consecutive_failures = consecutive_failures + 1, "
            "  failing_since = COALESCE(failing_since, now()), "
            f"  status = CASE WHEN {due} THEN 'suspended' ELSE status END, "
            f"  suspended_at = CASE WHEN {due} THEN now() ELSE suspended_at END, "
            "  last_error = %(error)s "
            "WHERE uuid::text = %(uuid)s RETURNING consecutive_failures, status",
            {"n": self.threshold, "s": self.min_seconds,
             "error": f"{type(exc).__name__}: {exc}"[:1000], "uuid": self.uuid}).fetchone()
        if row is None:
            return "subscription deleted"
        failures, status = row
        if status != "active":
            log.warning("subscription suspended", extra={"subscription": self.uuid,
                                                         "failures": failures})
            return f"subscription suspended after {failures} consecutive failed deliveries"
        return None
