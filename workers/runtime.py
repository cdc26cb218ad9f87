"""Per-process connections a worker needs, opened on first use (after Celery forks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from psycopg_pool import ConnectionPool

from config.settings import ConfigError, Settings
from ingest.queue import IngestStream, make_redis
from sinks.base import Sink
from sinks.db import make_pool
from sinks.postgres import PostgresSink
from sinks.registry import sink_class
from workers import subscribers
from workers.control import SinkControl
from workers.events import Event
from workers.metrics import MeasuredSink, Recorder
from workers.routing import Routing, SinkSpec, load


def sink_queue(settings: Settings, sink: str) -> str:
    """The Celery queue of a sink's deliveries; every subscription shares one."""
    if subscribers.is_target(sink):
        return subscriptions_queue(settings)
    return f"{settings.namespace}.sink.{sink}"


def subscriptions_queue(settings: Settings) -> str:
    return f"{settings.namespace}.subscriptions"


@dataclass
class Target:
    """Where one delivery task sends: the sink, its policy, and (subscriptions) its health."""

    sink: Sink | None
    spec: SinkSpec
    health: subscribers.Health | None = None
    gone: str = ""  # why the target cannot receive now (its deliveries go to dead letters)
    # why one pending event is no longer the target's (a subscription changed since), or None
    refuses: Callable[[Event], str | None] | None = None


class Runtime:
    """Settings plus the lazily opened Redis, Postgres, routing and sinks of one process."""

    def __init__(self, settings: Settings, app: Any = None, interactive: bool = False):
        """`interactive`: the runtime of operator requests (ingest.admin), which must answer
        in seconds: Redis calls with the ingest path's timeout and no retries, a 2 s wait for
        a pooled connection, broadcasts to the nodes not waited for past that timeout (a
        worker's rides out a blip: 10 s, 3 retries, 5 s)."""
        if not settings.redis_url or not settings.database_url:
            raise ConfigError("LEADPIPE_REDIS_URL and LEADPIPE_DATABASE_URL must both be set")
        self.settings = settings
        self.app = app
        self.interactive = interactive
        self.redis_timeout = settings.redis_timeout_seconds if interactive else 10.0
        self.redis_retries = 0 if interactive else 3
        self.db_timeout = 2.0 if interactive else 5.0
        self._sinks: dict[str, Sink] = {}
        self._subscriptions: dict[str, tuple[subscribers.Subscription, Sink]] = {}

    @cached_property
    def redis(self):  # type: ignore[no-untyped-def]
        assert self.settings.redis_url
        return make_redis(self.settings.redis_url, timeout=self.redis_timeout,
                          retries=self.redis_retries)

    @cached_property
    def stream(self) -> IngestStream:
        return IngestStream(self.redis, self.settings.stream_key)

    @cached_property
    def postgres(self) -> PostgresSink:
        assert self.settings.database_url
        return PostgresSink("postgres", {"dsn": self.settings.database_url},
                            pool=make_pool(self.settings.database_url, timeout=self.db_timeout))

    @cached_property
    def pool(self) -> ConnectionPool:
        """Autocommit connections for deliveries: every attempt is recorded at once."""
        assert self.settings.database_url
        return make_pool(self.settings.database_url, autocommit=True, timeout=self.db_timeout)

    @cached_property
    def routing(self) -> Routing:
        return load(self.settings.routes_file)

    @cached_property
    def metrics(self) -> Recorder:
        return Recorder(self.redis, self.settings.namespace)

    @cached_property
    def control(self) -> SinkControl:
        return SinkControl(self.redis, self.settings.namespace)

    def sink(self, name: str) -> Sink:
        if name not in self._sinks:
            spec = self.routing.sinks[name]
            cls = sink_class(spec.type)
            kwargs: dict[str, Any] = {}
            if spec.type == "email":  # the once-per-recipient ledger lives in our database
                from sinks.email import PostgresLedger

                kwargs["ledger"] = PostgresLedger(self.settings.database_url)
            self._sinks[name] = MeasuredSink(cls(name, spec.options, **kwargs), self.metrics)
        return self._sinks[name]

    def router(self) -> Callable[[Event], list[str]]:
        """Where each event of the next batch goes: the routing file's sinks, then the
        subscriptions (read once per batch, so a new subscription gets the next batch)."""
        with self.pool.connection() as conn:
            match = subscribers.matcher(conn)
        sinks_for = self.routing.sinks_for
        return lambda event: sinks_for(event) + match(event)

    def target(self, conn: Any, name: str) -> Target | None:
        """The sink behind a delivery target name; None for a sink no longer configured."""
        if not subscribers.is_target(name):
            spec = self.routing.sinks.get(name)
            return None if spec is None else Target(self.sink(name), spec)
        spec = subscribers.spec(name)
        sub = subscribers.load(conn, name)
        if sub is None:
            self._drop_subscription(name)
            return Target(None, spec, gone="subscription deleted")
        if sub.status != "active":
            return Target(None, spec, gone=f"subscription {sub.status}")
        cached = self._subscriptions.get(name)
        if cached is None or cached[0] != sub:  # new, or its URL, relations or secrets changed
            self._drop_subscription(name)
            sink = MeasuredSink(sink_class("webhook")(name, sub.options(self.settings)),
                                self.metrics)
            cached = self._subscriptions[name] = (sub, sink)
        return Target(cached[1], spec,
                      subscribers.Health(sub, self.settings.subscription_suspend_after,
                                         self.settings.subscription_suspend_after_seconds),
                      refuses=sub.refuses)

    def _drop_subscription(self, name: str) -> None:
        old = self._subscriptions.pop(name, None)
        if old is not None:
            old[1].close()

    @property
    def longest_wait(self) -> float:
        """The longest countdown a task may be given: half the visibility timeout (a worker
        holding a task longer may see Redis hand it to another one)."""
        return self.settings.visibility_timeout_seconds / 2

    def publish(self, sink: str, event_ids: list[str], round_: int = 0,
                countdown: float = 0.0, dispatch: str | None = None,
                due: float | None = None) -> None:
        """Queue deliveries to one sink, in chunks, on that sink's own queue (`dispatch`: the
        relay's name for the task, which the deliveries' rows carry).

        A worker holds a task waiting out its countdown unacknowledged, and Redis hands it to
        another worker once LEADPIPE_VISIBILITY_TIMEOUT_SECONDS pass: a countdown longer than
        half of that is made in hops, a task that only sends itself on until `due` (epoch
        seconds) comes."""
        assert self.app is not None, "publishing needs the Celery app"
        if countdown > self.longest_wait:
            due = time.time() + countdown if due is None else due
            countdown = self.longest_wait
        kwargs: dict[str, Any] = {} if dispatch is None else {"dispatch": dispatch}
        if due is not None:
            kwargs["due"] = due
        for start in range(0, len(event_ids), 100):
            self.app.send_task("leadpipe.deliver", args=[sink, event_ids[start:start + 100],
                                                         round_], kwargs=kwargs,
                               queue=sink_queue(self.settings, sink),
                               countdown=countdown or None)

    def close(self) -> None:
        """Close the sinks and whatever stores were opened (a pool left to the garbage
        collector may be collected on one of its own threads, which cannot join itself)."""
        for sink in self._sinks.values():
            sink.close()
        for name in list(self._subscriptions):
            self._drop_subscription(name)
        opened = self.__dict__
        if "postgres" in opened:
            opened.pop("postgres").close()
        if "pool" in opened:
            opened.pop("pool").close()
        if "redis" in opened:
            opened.pop("redis").close()
