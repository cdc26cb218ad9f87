"""Readiness: can this node take webhooks right now, and is the rest up? Reveals no detail of
why not."""

from __future__ import annotations

import logging

import redis

from config.settings import Settings

log = logging.getLogger("leadpipe.health")


def readiness(settings: Settings, client: redis.Redis) -> dict[str, bool]:
    checks = {"redis": False, "postgres": False, "migrations": False}
    try:
        checks["redis"] = bool(client.ping())
    except redis.RedisError as exc:
        log.warning("readiness: redis check failed: %s", type(exc).__name__)
    if settings.database_url:
        from sinks.db import current_revision

        try:
            current, head = current_revision(settings.database_url)
            checks["postgres"] = True
            checks["migrations"] = current == head
        except Exception as exc:  # any failure means not ready; the reason goes to the log only
            log.warning("readiness: postgres check failed: %s", type(exc).__name__)
    else:
        checks.pop("postgres")
        checks.pop("migrations")
    return checks


def verdict(checks: dict[str, bool], spooling: bool, full: bool = False) -> tuple[str, bool]:
    """("ok" | "degraded" | "unavailable", ready?). Taking webhooks needs Redis only (or a spool
    that holds them while Redis is away): a Postgres outage or a migration still to run must not
    take the ingest endpoint out of a load balancer, or RD's deliveries would be refused and,
    after RD's few retries, lost. `full`: ready only when every check passes."""
    if all(checks.values()):
        return "ok", True
    takes_webhooks = checks["redis"] or spooling
    if full or not takes_webhooks:
        return "unavailable", False
    return "degraded", True
