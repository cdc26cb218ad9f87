"""What the /ops dashboard shows, as plain data: counters, the last hour, sinks, failures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from config import pii
from workers import status
from workers.metrics import HISTOGRAMS
from workers.runtime import Runtime

DURATION_BOUNDS = HISTOGRAMS["leadpipe_delivery_duration_seconds"][2]

Row = tuple[str, dict[str, str], Any, float]  # (metric, labels, histogram bucket, value)


def _kind(name: str, labels: dict[str, str]) -> str | None:
    """Which plotted series a counter adds to: in, processed, delivered, failed (or none)."""
    if name == "leadpipe_ingest_requests":
        return "in" if labels.get("status") == "202" else None
    if name == "leadpipe_events":
        return "processed"
    if name == "leadpipe_deliveries":
        outcome = labels.get("outcome")
        if outcome == "delivered":
            return "delivered"
        if outcome in {"retrying", "dead"}:
            return "failed"
    return None


def _sum(rows: list[Row]) -> dict[str, float]:
    out = dict.fromkeys(("in", "processed", "delivered", "failed", "quarantined", "duplicate",
                         "dead"), 0.0)
    for name, labels, extra, value in rows:
        if extra is not None:
            continue  # a histogram's bucket
        kind = _kind(name, labels)
        if kind:
            out[kind] += value
        if name == "leadpipe_events" and labels["outcome"] in {"quarantined", "duplicate"}:
            out[labels["outcome"]] += value
        if name == "leadpipe_deliveries" and labels["outcome"] == "dead":
            out["dead"] += value
    return out


def p95(buckets: dict[Any, float], bounds: Sequence[float] = DURATION_BOUNDS) -> float | None:
    """The 95th percentile from one histogram's per-bucket counts, as Prometheus'
    histogram_quantile gives it: interpolated within the bucket between its bound and the one
    defined before it (0 for the first), and the largest finite bound when it falls past it."""
    total = sum(buckets.values())
    if not total:
        return None
    rank, running, lower = 0.95 * total, 0.0, 0.0
    for bound in bounds:
        count = buckets.get(bound, 0.0)
        if count and running + count >= rank:
            return lower + (bound - lower) * (rank - running) / count
        running += count
        lower = bound
    return bounds[-1]  # in +Inf: the largest finite bound is all that is known


def _sink_hour(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per sink over the rows' span: rounds delivered/failed, and p95 of one call's duration."""
    sinks: dict[str, dict[str, Any]] = {}
    for name, labels, extra, value in rows:
        sink = labels.get("sink")
        if sink is None:
            continue
        s = sinks.setdefault(sink, {"delivered": 0.0, "failed": 0.0, "durations": {}})
        if name == "leadpipe_deliveries":
            kind = _kind(name, labels)
            if kind:
                s[kind] += value
        elif name == "leadpipe_delivery_duration_seconds" and extra != "sum":
            s["durations"][extra] = s["durations"].get(extra, 0.0) + value
    out = {}
    for sink, s in sinks.items():
        ended = s["delivered"] + s["failed"]
        latency = p95(s["durations"])
        out[sink] = {"delivered_hour": int(s["delivered"]), "failed_hour": int(s["failed"]),
                     "success_rate": round(s["delivered"] / ended, 4) if ended else None,
                     "p95_ms": None if latency is None else round(latency * 1000, 1)}
    return out


def overview(runtime: Runtime, minutes: int = 60) -> dict[str, Any]:
    """Everything the dashboard polls for, in one answer (workers apart: they take a while)."""
    state = status.collect(runtime)
    out: dict[str, Any] = {"now": time.time(), "redis_up": state.redis_up,
                           "postgres_up": state.postgres_up,
                           "flower_url": runtime.settings.flower_url,
                           "ingest": {"depth": state.ingest_depth, "unread": state.ingest_unread,
                                      "oldest_seconds": state.ingest_oldest_seconds},
                           "quarantined": state.quarantined}
    hour: list[Row] = []
    series = []
    totals = _sum([])
    if state.redis_up:
        recorder = runtime.metrics
        totals = _sum([_row(raw, value) for raw, value in
                       recorder.client.hgetall(recorder.key).items()])
        for minute, rows in recorder.minutes(minutes):
            hour += rows
            sums = _sum(rows)
            series.append({"t": minute * 60, **{k: sums[k] for k in
                                                 ("in", "processed", "delivered", "failed")}})
    out["totals"] = {k: int(v) for k, v in totals.items()}
    out["series"] = series
    # live rates: the last full minute and the one under way, over the time they cover
    covered = 60 + time.time() % 60
    out["rates"] = {k: round(sum(point[k] for point in series[-2:]) / covered, 3)
                    for k in ("in", "processed", "delivered", "failed")}
    per_hour = _sink_hour(hour)
    out["sinks"] = [{**s, **per_hour.get(name, {"delivered_hour": 0, "failed_hour": 0,
                                                "success_rate": None, "p95_ms": None})}
                    for name, s in sorted(state.as_dict()["sinks"].items())]
    out["dead_letters"] = dead_letters(runtime) if state.postgres_up else []
    out["quarantine"] = quarantine(runtime) if state.postgres_up else []
    return out


def _row(raw: bytes, value: bytes) -> Row:
    import orjson

    name, labels, extra = orjson.loads(raw)
    return name, dict(labels), extra, float(value)


def _rows(runtime: Runtime, sql: str, limit: int, text: str) -> list[dict[str, Any]]:
    """Rows as dicts; their `payload` becomes the masked `person`, PII in `text` is masked."""
    with runtime.pool.connection() as conn:
        cur = conn.execute(sql, (limit,))
        names = [c.name for c in cur.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in cur]
    for row in rows:
        row["person"] = pii.masked_person(row.pop("payload"))
        row[text] = pii.mask_text(row[text] or "")
    return rows


def dead_letters(runtime: Runtime, limit: int = 50) -> list[dict[str, Any]]:
    """Dead letters waiting for replay, newest first, with the lead masked."""
    return _rows(runtime,
                 "SELECT d.id, d.event_id, d.sink, d.error, d.status_code, d.attempts, "
                 "d.dead_at, e.event_type, e.payload FROM dead_letters d "
                 "LEFT JOIN events e ON e.id = d.event_id WHERE d.replayed_at IS NULL "
                 "ORDER BY d.id DESC LIMIT %s", limit, "error")


def quarantine(runtime: Runtime, limit: int = 20) -> list[dict[str, Any]]:
    """The newest quarantined bodies with their reasons, the person in them masked."""
    return _rows(runtime,
                 "SELECT id, received_at, quarantined_at, replays, reason, event_type_hint, "
                 "payload FROM quarantine "
                 "ORDER BY quarantined_at DESC, received_at DESC, id DESC LIMIT %s", limit,
                 "reason")


REVEALABLE = {"dead_letter": "SELECT e.payload FROM dead_letters d JOIN events e "
                             "ON e.id = d.event_id WHERE d.id = %s",
              "quarantine": "SELECT payload FROM quarantine WHERE id = %s"}


def reveal(runtime: Runtime, kind: str, record_id: str) -> dict[str, str | None] | None:
    """The unmasked person of one dead letter or quarantined body; None if there is none."""
    if kind == "dead_letter" and not record_id.isdigit():
        return None
    with runtime.pool.connection() as conn:
        row = conn.execute(REVEALABLE[kind], (record_id,)).fetchone()
    return None if row is None else pii.person(row[0])

