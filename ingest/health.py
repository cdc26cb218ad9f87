"""Readiness: can this node take webhooks right now, and is the rest up? Reveals no detail of
why not."""

from __future__ import annotations

import logging
import threading
import time

import redis

from config.settings import Settings

log = logging.getLogger("leadpipe.health")

POSTGRES_EVERY_SECONDS = 2.0


class Readiness:
    """The checks /readyz reports for one app. Redis is pinged on every call; Postgres, which
    costs a new connection, is asked at most every POSTGRES_EVERY_SECONDS whatever the number
    of callers (the route needs no token: a flood of probes must not become a flood of
    connections), the callers in between given its last answer."""

    def __init__(self, settings: Settings, client: redis.Redis,
                 every: float = POSTGRES_EVERY_SECONDS):
        self.settings = settings
        self.client = client
        self.every = every
        self._lock = threading.Lock()
        self._postgres: dict[str, bool] = {"postgres": False, "migrations": False}
        self._asked = -float("inf")

    def checks(self) -> dict[str, bool]:
        checks = {"redis": False}
        try:
            checks["redis"] = bool(self.client.ping())
        except redis.RedisError as exc:
            log.warning("readiness: redis check failed: %s", type(exc).__name__)
        if self.settings.database_url:
            with self._lock:  # one check at a time; those waiting take its answer
                if time.monotonic() - self._asked >= self.every:
                    self._postgres = self._ask_postgres(self.settings.database_url)
                    self._asked = time.monotonic()
                checks.update(self._postgres)
        return checks

    @staticmethod
    def _ask_postgres(dsn: str) -> dict[str, bool]:
        from sinks.db import current_revision

        try:
            current, head = current_revision(dsn)
        except Exception as exc:  # any failure means not ready; the reason goes to the log only
            log.warning("readiness: postgres check failed: %s", type(exc).__name__)
            return {"postgres": False, "migrations": False}
        return {"postgres": True, "migrations": current == head}


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
