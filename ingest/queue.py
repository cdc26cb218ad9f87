"""The ingest stream on Redis: the request path appends raw bodies, workers read them in batches."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ingest.commit import GroupCommit, ThreadWriter

GROUP = "workers"


def new_event_id() -> str:
    """A time-ordered, random event id in UUIDv7 layout (sortable by arrival)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (
        rand & 0x3FFF_FFFF_FFFF_FFFF
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class Entry:
    """One raw webhook as it sits on the stream."""

    entry_id: str
    event_id: str
    received_ms: int
    body: bytes
    hint: str | None


def make_redis(url: str, timeout: float | None = None, retries: int = 3) -> redis.Redis:
    """A client; the ingest path asks for no retries so an outage becomes a prompt 503."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(), retries),
    )


class IngestStream:
    """Appends to and consumes from one Redis Stream with one consumer group."""

    def __init__(self, client: redis.Redis, key: str, writer: str | None = None,
                 commit_timeout: float = 5.0):
        """`writer`: None (the client's own XADD), "group" (GroupCommit) or "thread"
        (ThreadWriter: one connection per request thread), the latter two for the request path."""
        self.client = client
        self.key = key
        self._commit: GroupCommit | ThreadWriter | None = None
        if writer == "group":
            self._commit = GroupCommit(client, key, timeout=commit_timeout)
        elif writer == "thread":
            self._commit = ThreadWriter(client, key)
        elif writer is not None:
            raise ValueError(f"unknown stream writer {writer!r}")

    def append(self, event_id: str, body: bytes, hint: str | None = None) -> None:
        """Durably add one raw body; returns only once Redis has it (raises RedisError if not)."""
        fields: dict[str, bytes | str | int] = {"i": event_id, "t": time.time_ns() // 1_000_000,
                                                 "b": body}
        if hint:
            fields["h"] = hint
        if self._commit is not None:
            self._commit.append(fields)
        else:
            self.client.xadd(self.key, fields)  # type: ignore[arg-type]

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def register(self, consumer: str) -> None:
        """Make the consumer visible in XINFO CONSUMERS before it has read anything."""
        self.client.xgroup_createconsumer(self.key, GROUP, consumer)

    def read_new(self, consumer: str, count: int, block_ms: int, max_bytes: int,
                 largest: int) -> list[tuple[str, int]]:
        """Claim up to `count` never-delivered entries for `consumer`, about `max_bytes` of
        bodies at most (past it by one body, of at most `largest` bytes); their ids and the
        sizes of their bodies. Bodies stay in Redis: only ids and sizes come back. Waits up to
        `block_ms` for one entry when there is none."""
        found = self._take("new", consumer, count, max_bytes, largest)
        if found or block_ms <= 0:
            return found
        reply = self.client.xreadgroup(GROUP, consumer, {self.key: ">"}, count=1,
                                       block=block_ms)
        if not reply:
            return []
        return [(_s(entry_id), _size(f)) for entry_id, f in reply[0][1]]

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int, max_bytes: int,
                    largest: int) -> list[tuple[str, int]]:
        """Take over up to `count` entries another (likely dead) consumer has held for longer
        than min_idle_ms, bounded in bytes as read_new; their ids and the sizes of their
        bodies."""
        return self._take("claim", consumer, count, max_bytes, largest, min_idle_ms)

    def _take(self, mode: str, consumer: str, count: int, max_bytes: int, largest: int,
              min_idle_ms: int = 0) -> list[tuple[str, int]]:
        reply = self.client.eval(_TAKE, 1, self.key, GROUP, consumer, count, max_bytes,
                                 max(1, largest), mode, min_idle_ms)
        return [(_s(reply[n]), int(reply[n + 1])) for n in range(0, len(reply), 2)]

    def forget_idle_consumers(self, idle_ms: int, keep: str) -> int:
        """Remove from the group the consumers that hold no entry and have not read for
        `idle_ms` (workers gone for good: each life of a worker is a consumer of its own),
        `keep` aside. Checked and removed in one script: a consumer that takes an entry
        meanwhile is never removed with it (its entries would never be claimed again)."""
        return int(self.client.eval(_FORGET_IDLE, 1, self.key, GROUP, idle_ms, keep))

    def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries still being worked on, so no one claims them."""
        if entry_ids:
            self.client.xclaim(self.key, GROUP, consumer, 0, entry_ids, justid=True)

    def pending_for(self, consumer: str) -> int:
        summary = self.client.xpending(self.key, GROUP)
        for row in summary.get("consumers") or []:
            if _s(row["name"]) == consumer:
                return int(row["pending"])
        return 0

    def fetch(self, entry_ids: list[str]) -> list[Entry]:
        """The entries still on the stream among `entry_ids` (acknowledged ones are gone), in
        the order given.

        A batch is mostly a run of neighbouring entries, so one XRANGE over its span, capped at
        twice its size, usually finds them all; ids past where the cap stopped it (entries of
        other consumers in between) are read one XRANGE each, in one pipeline.
        """
        if not entry_ids:
            return []
        ordered = sorted(entry_ids, key=_id_order)
        cap = 2 * len(ordered)
        rows = self.client.xrange(self.key, ordered[0], ordered[-1], count=cap)
        found = {entry.entry_id: entry for entry in map(_entry, rows)}
        if len(rows) == cap:  # stopped early: what lies past the last row is not seen yet
            last = _id_order(_s(rows[-1][0]))
            pipe = self.client.pipeline(transaction=False)
            for entry_id in ordered:
                if _id_order(entry_id) > last:
                    pipe.xrange(self.key, entry_id, entry_id)
            for one in pipe.execute():
                found.update((entry.entry_id, entry) for entry in map(_entry, one))
        return [found[entry_id] for entry_id in entry_ids if entry_id in found]

    def entries(self, chunk: int = 1000) -> Iterator[Entry]:
        """Every entry on the stream, read or not, oldest first (`chunk` per XRANGE)."""
        start = "-"
        while True:
            rows = self.client.xrange(self.key, start, "+", count=chunk)
            yield from map(_entry, rows)
            if len(rows) < chunk:
                return
            start = "(" + _s(rows[-1][0])

    def done(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete entries in one transaction: they are safely stored elsewhere."""
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.key, GROUP, *entry_ids)
        pipe.xdel(self.key, *entry_ids)
        pipe.execute()

    def depth(self) -> int:
        return int(self.client.xlen(self.key))


# Entries for a consumer, new (XREADGROUP) or stale (XAUTOCLAIM), taken in steps no larger than
# the bytes left allow at the largest body size, until `count` entries or `max_bytes` of bodies:
# the pump learns sizes without any body leaving Redis, and a backlog of large bodies is taken
# about a batch at a time. Returns a flat list: id, size, id, size, ...
_TAKE = """
local key, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local count, limit, largest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local claim, min_idle = ARGV[6] == 'claim', ARGV[7]
local out, n, total, cursor, calls = {}, 0, 0, '0-0', 0
local function add(entry)
  local fields, len = entry[2], 0
  if fields then
    for i = 1, #fields, 2 do
      if fields[i] == 'b' then len = #fields[i + 1] end
    end
  end
  out[#out + 1] = entry[1]
  out[#out + 1] = len
  n = n + 1
  total = total + len
end
while n < count and total < limit do
  local step = math.max(1, math.min(count - n, math.floor((limit - total) / largest)))
  local entries
  if claim then
    -- each call looks at no more than 10 x COUNT pending entries: bounded overall too
    calls = calls + 1
    if calls > 10 * count then break end
    local reply = redis.call('XAUTOCLAIM', key, group, consumer, min_idle, cursor, 'COUNT', step)
    cursor, entries = reply[1], reply[2]
  else
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', step,
                             'STREAMS', key, '>')
    if not reply then break end
    entries = reply[1][2]
  end
  for _, entry in ipairs(entries) do
    if entry and entry ~= false and entry[1] then add(entry) end
  end
  if claim and cursor == '0-0' then break end
  if not claim and #entries < step then break end
end
return out
"""

_FORGET_IDLE = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


def _size(f: dict[bytes, bytes] | None) -> int:
    return len(f.get(b"b", b"")) if f else 0


def _entry(row: tuple[bytes, dict[bytes, bytes]]) -> Entry:
    entry_id, f = row
    hint = f.get(b"h")
    return Entry(_s(entry_id), _s(f[b"i"]), int(f[b"t"]), f[b"b"], hint.decode() if hint else None)


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
