"""The broker transport: kombu's Redis transport, made to survive the loss of Redis itself.

When Redis goes away, Celery's consumer first collects its broker connection (which detaches
the transport from it) and then closes it. Closing the default channel then tries to hand the
channel's unacknowledged tasks back to Redis through a transport that no longer knows its
server, and kombu's stock channel fails with an AttributeError that Celery treats as fatal: the
worker exits. Here the detached channel raises a connection error instead, which Celery already
handles (the consumer reconnects). Nothing is lost by not restoring at that moment: kombu keeps
every delivered task in Redis until it is acknowledged and restores it after the visibility
timeout, and the ingest stream's pending entries are claimed again on their own.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

#: URL schemes served by this transport; other schemes keep kombu's own.
SCHEMES = ("redis",)


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection.client is None:  # the transport was detached from its connection
            raise RedisConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(url: str) -> str | None:
    """The transport for a broker URL: ours for plain Redis, kombu's choice otherwise."""
    return f"{__name__}:Transport" if urlsplit(url).scheme in SCHEMES else None
