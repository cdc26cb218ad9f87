"""The pipeline's state now, read from Redis and Postgres: for /metrics and `leadpipe status`."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import kombu.exceptions
import psycopg
import redis
from psycopg_pool import PoolTimeout

from config.settings import Settings
from ingest.durability import redis_durability
from ingest.queue import GROUP
from workers.runtime import Runtime, sink_queue, subscriptions_queue

log = logging.getLogger("leadpipe.status")


@dataclass
class SinkState:
    sink: str
    type: str  # the sink type, "?" for one no longer in the routing file
    paused: bool = False
    circuit: str = "closed"  # closed, open, half-open
    pending: int = 0  # deliveries waiting (the sink's queue)
    oldest_pending_seconds: float = 0.0  # age of the oldest waiting delivery
    oldest_lead_seconds: float = 0.0  # since the oldest lead not yet delivered arrived
    dead: int = 0  # dead letters not replayed
    delivered: int | None = None  # only when asked for: it counts a table that only grows


@dataclass
class PipelineState:
    redis_up: bool = False
    postgres_up: bool = False
    ingest_depth: int = 0  # entries on the ingest stream: not yet read + being stored
    ingest_unread: int = 0  # not yet read by any worker's pump
    ingest_oldest_seconds: float = 0.0  # age of the oldest entry still on the stream
    quarantined: int = 0
    # erasures recorded whose rows are not changed yet: running now, or failed and waiting to
    # be run again (meanwhile the person's bodies are dropped and storing reads every body)
    unfinished_erasures: int = 0
    sinks: dict[str, SinkState] = field(default_factory=dict)
    # whether Redis keeps what the endpoint acknowledges (ingest.durability): true, false, or
    # null when it cannot tell; the text says what Redis runs with or what is at risk
    redis_durable: bool | None = None
    redis_durability: str = "unknown: Redis unreachable"
    # what is wrong when not postgres_up (JSON: null when it is up)
    postgres_problem: str = "UNREACHABLE: check LEADPIPE_DATABASE_URL"

    def as_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data; a sink's pause and circuit are None (unknown, not
        "running, closed") when Redis could not be read."""
        out = asdict(self)
        if self.postgres_up:
            out["postgres_problem"] = None
        if not self.redis_up:
            for sink in out["sinks"].values():
                sink.update(paused=None, circuit=None)
        return out


def collect(runtime: Runtime, delivered: bool = False) -> PipelineState:
    """Everything it can reach; an unreachable Redis or Postgres is reported, not raised."""
    state = PipelineState()
    for name, spec in runtime.routing.sinks.items():
        state.sinks[name] = SinkState(name, spec.type)
    try:  # Postgres first: it names the sinks the routing file does not (subscriptions),
        _postgres(runtime, state, delivered)  # whose pause and circuit Redis then tells
        state.postgres_up = True
    except psycopg.errors.UndefinedTable:
        state.postgres_problem = "NOT MIGRATED: run `leadpipe migrate`"
        log.warning("status: postgres not migrated")
    except (psycopg.Error, PoolTimeout) as exc:
        log.warning("status: postgres unreachable: %s", type(exc).__name__)
    try:
        _redis(runtime, state)
        state.redis_up = True
    except redis.RedisError as exc:
        log.warning("status: redis unreachable: %s", type(exc).__name__)
    return state


def _redis(runtime: Runtime, state: PipelineState) -> None:
    client, key = runtime.redis, runtime.settings.stream_key
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.xlen(key)
    pipe.xrange(key, "-", "+", count=1)
    pipe.exists(key)
    now, depth, first, exists = pipe.execute()
    state.ingest_depth = int(depth)
    held = 0
    if exists:
        groups = {g["name"]: g for g in _decoded(client.xinfo_groups(key))}
        held = int(groups.get(GROUP, {}).get("pending", 0))
    state.ingest_unread = max(state.ingest_depth - held, 0)
    if first:
        now_ms = now[0] * 1000 + now[1] // 1000
        # on Redis' clock, from the entry's id (when Redis took it), plus what a body the
        # spool held through a Redis outage waited there (`w`, measured on the API host's
        # clock alone): never the API host's clock against Redis'
        entry_id, fields = first[0]
        waited = int(fields.get(b"w") or 0)
        added = int(entry_id.split(b"-")[0])
        state.ingest_oldest_seconds = max(now_ms - added + waited, 0) / 1000
    state.redis_durable, state.redis_durability = redis_durability(client)
    paused = runtime.control.paused()
    for name, sink in state.sinks.items():
        sink.paused = name in paused
        sink.circuit = runtime.control.circuit_state(name)


def _decoded(groups: list[dict]) -> list[dict]:
    return [{k: v.decode() if isinstance(v, bytes) else v for k, v in g.items()} for g in groups]


def _postgres(runtime: Runtime, state: PipelineState, delivered: bool) -> None:
    def sink(name: str) -> SinkState:
        return state.sinks.setdefault(name, SinkState(name, "?"))

    with runtime.pool.connection() as conn:
        for name, n, oldest, oldest_lead in conn.execute(
                "SELECT d.sink, count(*), extract(epoch FROM now() - min(d.created_at)), "
                "  extract(epoch FROM now() - min(e.received_at) "
                "                             FILTER (WHERE e.entity_type = 'CONTACT')) "
                "FROM deliveries d JOIN events e ON e.id = d.event_id "
                "WHERE d.status = 'pending' GROUP BY d.sink"):
            s = sink(name)
            s.pending = n
            s.oldest_pending_seconds = max(float(oldest), 0.0)
            s.oldest_lead_seconds = max(float(oldest_lead or 0), 0.0)
        for name, n in conn.execute("SELECT sink, count(*) FROM dead_letters "
                                    "WHERE replayed_at IS NULL GROUP BY sink"):
            sink(name).dead = n
        row = conn.execute("SELECT count(*) FROM quarantine").fetchone()
        state.quarantined = int(row[0]) if row else 0
        row = conn.execute("SELECT count(*) FROM erasures WHERE touched = '{}'").fetchone()
        state.unfinished_erasures = int(row[0]) if row else 0
        if delivered:
            for s in state.sinks.values():
                s.delivered = 0
            for name, n in conn.execute("SELECT sink, count(*) FROM deliveries "
                                        "WHERE status = 'delivered' GROUP BY sink"):
                sink(name).delivered = n


def workers(app: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """This namespace's Celery workers that answered within `timeout` (per inspect call): the
    queues they consume, their pool size and the tasks they have run, by name."""
    settings = app.leadpipe.settings
    inspect = app.control.inspect(timeout=timeout)
    try:
        queues = inspect.active_queues() or {}
        stats = inspect.stats() or {}
    except (OSError, kombu.exceptions.KombuError, redis.RedisError) as exc:
        log.warning("status: workers could not be asked: %s", type(exc).__name__)
        return {}
    found = {}
    for name, consumed in sorted(queues.items()):
        ours = sorted(q["name"] for q in consumed if _ours(q["name"], settings))
        if not ours:
            continue  # a worker of another namespace on the same broker
        info = stats.get(name, {})
        found[name] = {"queues": ours,
                       "pool": (info.get("pool") or {}).get("max-concurrency"),
                       "processed": {task.removeprefix("leadpipe."): n
                                     for task, n in sorted((info.get("total") or {}).items())}}
    return found


def _ours(queue: str, settings: Settings) -> bool:
    """A queue of this namespace, not of another whose name starts with ours and a dot
    (`<ns>.eu.ingest`): its own queues, or a sink's (whose names hold no dot)."""
    sinks = sink_queue(settings, "")
    return queue in (settings.ingest_queue, settings.default_queue,
                     subscriptions_queue(settings)) or (
        queue.startswith(sinks) and len(queue) > len(sinks) and "." not in queue[len(sinks):])


def age(seconds: float | None) -> str:
    """4s, 3m05s, 2h10m, 3d04h; "-" for none."""
    if not seconds:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render(state: PipelineState, found: dict[str, dict[str, Any]], timeout: float) -> str:
    """The terminal summary of `leadpipe status`."""
    lines = []
    if state.redis_up:
        lines.append(f"ingest stream  depth {state.ingest_depth}  unread {state.ingest_unread}  "
                     f"oldest {age(state.ingest_oldest_seconds)}")
    else:
        lines.append("ingest stream  REDIS UNREACHABLE: check LEADPIPE_REDIS_URL")
    if state.redis_up:
        lines.append(f"redis          {state.redis_durability}")
    lines.append(f"quarantine     {state.quarantined if state.postgres_up else '?'}")
    if state.postgres_up and state.unfinished_erasures:
        lines.append(f"erasures       {state.unfinished_erasures} UNFINISHED: run `leadpipe erase` "
                     "again for each person (until then storing reads every body)")
    if not state.postgres_up:
        lines.append(f"POSTGRES {state.postgres_problem}: sink counts unknown")
    header = ("sink", "state", "circuit", "pending", "oldest", "oldest lead", "delivered", "dead")
    known = state.postgres_up  # else the counts below were never read: show "?", not 0

    def count(value: object) -> str:
        return str(value) if known and value is not None else "?"

    live = state.redis_up  # else pause and circuit were never read: "?", not running/closed

    rows = [header] + [
        (s.sink, ("PAUSED" if s.paused else "running") if live else "?",
         s.circuit if live else "?", count(s.pending),
         age(s.oldest_pending_seconds) if known else "?",
         age(s.oldest_lead_seconds) if known else "?", count(s.delivered), count(s.dead))
        for s in sorted(state.sinks.values(), key=lambda s: s.sink)]
    if len(rows) == 1:
        lines.append("sinks          none (Postgres only: no routing file)")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
    lines.append(f"workers        {len(found)} answered within {timeout:g}s")
    for name, info in found.items():
        done = ", ".join(f"{task} {n}" for task, n in info["processed"].items()) or "none yet"
        lines.append(f"  {name}  pool {info['pool']}  queues {len(info['queues'])}  "
                     f"tasks run: {done}")
    return "\n".join(lines)
