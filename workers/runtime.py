"""Per-process connections a worker needs, opened on first use (after Celery forks)."""

from __future__ import annotations

from functools import cached_property

from config.settings import ConfigError, Settings
from ingest.queue import IngestStream, make_redis
from sinks.postgres import PostgresSink


class Runtime:
    """Settings plus the lazily opened Redis stream and Postgres sink of one process."""

    def __init__(self, settings: Settings):
        if not settings.redis_url or not settings.database_url:
            raise ConfigError("LEADPIPE_REDIS_URL and LEADPIPE_DATABASE_URL must both be set")
        self.settings = settings

    @cached_property
    def stream(self) -> IngestStream:
        assert self.settings.redis_url
        return IngestStream(make_redis(self.settings.redis_url, timeout=10),
                            self.settings.stream_key)

    @cached_property
    def postgres(self) -> PostgresSink:
        return PostgresSink("postgres", {"dsn": self.settings.database_url})
