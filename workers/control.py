"""Per-sink state shared by every worker through Redis: pause, rate limit, circuit breaker."""

from __future__ import annotations

import time

import redis

# GCRA: one event every `interval` microseconds, no burst. Returns 0 when allowed (and
# counted), else the whole microseconds to wait (at least 1: Redis truncates a script's number,
# and a fraction would read as 0, "allowed", though nothing was counted). In microseconds, as
# Redis' clock gives them, so a rate far past 1,000/s is held exactly and never rounded to the
# millisecond; stored as an integer (Lua would write a 16-digit number rounded).
_RATE_LUA = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now_us)
if tat < now_us then tat = now_us end
if tat > now_us then return math.max(1, tat - now_us) end
redis.call('SET', KEYS[1], string.format('%d', tat + interval), 'PX',
           math.ceil(interval / 1000) + 1000)
return 0
"""


class SinkControl:
    """Pause flags, rate limits and circuit breakers of all sinks in one namespace."""

    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.ns = namespace
        self._rate = client.register_script(_RATE_LUA)

    # -- pause -------------------------------------------------------------------------------
    @property
    def _paused_key(self) -> str:
        return f"{self.ns}:paused"

    def pause(self, sink: str) -> None:
        self.client.sadd(self._paused_key, sink)

    def resume(self, sink: str) -> None:
        self.client.srem(self._paused_key, sink)

    def paused(self) -> set[str]:
        return {m.decode() for m in self.client.smembers(self._paused_key)}

    def is_paused(self, sink: str) -> bool:
        return bool(self.client.sismember(self._paused_key, sink))

    # -- rate limit ----------------------------------------------------------------------------
    def rate_wait(self, sink: str, events: int, per_seconds: float) -> float:
        """0 when one more delivery may go now (and it is counted), else seconds to wait."""
        interval_us = max(1, round(per_seconds * 1_000_000 / events))
        # (a key of its own: a worker of an earlier version kept milliseconds in `rate:`)
        waited = self._rate(keys=[f"{self.ns}:rate-us:{sink}"], args=[interval_us])
        return float(waited) / 1_000_000

    # -- circuit breaker -----------------------------------------------------------------------
    def _circuit(self, sink: str) -> str:
        # a hash tag: the state and its ":probe" key share a Redis Cluster slot, so the one
        # two-key command (DEL when the circuit closes) is cluster-safe
        return f"{self.ns}:circuit:{{{sink}}}"

    def circuit_wait(self, sink: str, cooldown: float, caller: str = "") -> float:
        """0 when a call may go (closed, or this caller is the one half-open probe), else the
        seconds until the next probe may be tried.

        `caller` names the task asking: the probe is taken in its name, so the task that holds
        it may ask again (after a send that did not tell whether the sink is up) and go on."""
        open_until = self.client.hget(self._circuit(sink), "open_until")
        if open_until is None:
            return 0.0
        remaining = float(open_until) - time.time()
        if remaining > 0:
            return remaining
        # half-open: one probe at a time
        probe = f"{self._circuit(sink)}:probe"
        if self.client.set(probe, caller or 1, nx=True, px=int(cooldown * 1000)):
            return 0.0
        if caller and self.client.get(probe) == caller.encode():
            return 0.0
        return max(0.5, cooldown / 4)

    def circuit_success(self, sink: str) -> None:
        self.client.delete(self._circuit(sink), f"{self._circuit(sink)}:probe")

    def circuit_failure(self, sink: str, threshold: int, cooldown: float) -> bool:
        """Count a failure; True when the circuit is (now) open."""
        key = self._circuit(sink)
        failures = self.client.hincrby(key, "failures", 1)
        if failures >= threshold:
            self.client.hset(key, "open_until", time.time() + cooldown)
            self.client.delete(f"{key}:probe")
            return True
        return False

    def circuit_state(self, sink: str) -> str:
        open_until = self.client.hget(self._circuit(sink), "open_until")
        if open_until is None:
            return "closed"
        return "open" if float(open_until) > time.time() else "half-open"
