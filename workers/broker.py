"""The broker transport: kombu's Redis transport, made to survive the loss of Redis itself.

When Redis goes away, Celery's consumer first collects its broker connection (which detaches
the transport from it) and then closes it. Closing the default channel then tries to hand the
channel's unacknowledged tasks back to Redis through a transport that no longer knows its
server, and kombu's stock channel fails with an AttributeError that Celery treats as fatal: the
worker exits. Here the detached channel raises a connection error instead, which Celery already
handles (the consumer reconnects). Nothing is lost by not restoring at that moment: kombu keeps
every delivered task in Redis until it is acknowledged and restores it after the visibility
timeout, and the ingest stream's pending entries are claimed again on their own.

For `rediss://` URLs the broker checks the server's certificate, as the ingest stream's client
(redis-py) does; kombu alone would connect to a TLS broker without checking it.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

#: URL schemes served by this transport; other schemes keep kombu's own.
SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection.client is None:  # the transport was detached from its connection
            raise RedisConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(url: str) -> str | None:
    """The transport for a broker URL: ours for Redis (plain or TLS), kombu's otherwise."""
    return f"{__name__}:Transport" if urlsplit(url).scheme in SCHEMES else None


def tls_for(url: str) -> dict | None:
    """TLS options of a `rediss://` broker: the server's certificate is verified unless the
    URL says otherwise (`ssl_cert_reqs=none|optional`, `ssl_ca_certs=...`, as redis-py reads
    them; options in the URL replace these). kombu alone would connect without verifying."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if urlsplit(url).scheme == "rediss" else None
