"""Whether the Redis the endpoint writes to keeps what it acknowledges: AOF, fsync always."""

from __future__ import annotations

import redis


def redis_durability(client: redis.Redis) -> tuple[bool | None, str]:
    """(durable?, what Redis says): True when every write is in its append-only file and
    fsynced before it answers, as a 202 promises; False with what is at risk; None when Redis
    refuses CONFIG (a managed service may rename it) and its settings cannot be read.
    Raises RedisError when Redis cannot be reached."""
    try:
        found = client.config_get("append*")  # appendonly, appendfsync (and their files)
    except redis.ResponseError:
        return None, "unknown: Redis refuses CONFIG GET; make sure it runs with " \
                     "appendonly yes and appendfsync always"
    values = {_text(k): _text(v) for k, v in found.items()}
    if values.get("appendonly") != "yes":
        return False, ("NOT DURABLE: appendonly is no, so acknowledged events are lost if "
                       "Redis stops; set appendonly yes and appendfsync always")
    if values.get("appendfsync") != "always":
        return False, (f"NOT DURABLE: appendfsync is {values.get('appendfsync')}, so events "
                       "acknowledged in the last second are lost if the machine stops; set "
                       "appendfsync always")
    return True, "appendonly yes, appendfsync always"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
