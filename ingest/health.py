"""Readiness: can this node take and store events right now? Reveals no detail of why not."""

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
