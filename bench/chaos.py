"""Chaos: prove under failures that every acknowledged event is stored once and delivered once.

    python -m bench.chaos [--events 50000] [--window 300] [--seed 7]

One run against real processes: Redis (AOF, appendfsync always) and Postgres started in a
temporary folder, `leadpipe api` (granian, 2 processes), 2 `leadpipe worker` nodes (4
processes each), a CRM (local HTTP server), an SMTP server (aiosmtpd) and one subscriber made
through the subscription API. A load generator posts --events bodies built from the fixtures
(unique ids, 10 % exact duplicates, shuffled) at an even pace over --window seconds; like RD,
it retries a body until it gets a 2xx. Meanwhile a fault injector, on a fixed schedule drawn
from --seed:
- SIGKILLs a worker node 5 times, restarting it each time;
- kills Redis with SIGKILL once and starts it again on the same AOF files;
- stops Postgres for 15 s;
- makes the CRM answer 503 to 30 % of requests and hang past the sink's timeout on 5 %;
- makes the subscriber refuse connections for 20 s.
Then it waits for the stream and every delivery to settle and prints what each store and
receiver holds. Receivers apply each idempotency key once (as a CRM honouring Idempotency-Key,
a subscriber honouring webhook-id, a mailbox dropping a repeated Message-ID) and count repeats.

PASS: no API or worker process stopped on its own (a node killed by the injector is restarted);
every acknowledged unique event is in `events` exactly once; each one a sink routes to
was applied by that receiver under exactly one key, or sits in dead letters with a reason; no
receiver applied a key that belongs to no event; nothing pending; nothing quarantined.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench import (
    BenchError,
    machine,
    print_versions,
    tail,
    terminate_as_interrupt,
    wait_until,
)
from bench.drain import build
from bench.pipeline import Node, Pipeline
from bench.receivers import Receiver

CHAOS_SETTINGS = {"CLAIM_IDLE_SECONDS": "5", "RELAY_AFTER_SECONDS": "10",
                  "VISIBILITY_TIMEOUT_SECONDS": "45"}


@dataclass
class Figures:
    sent: int = 0
    acknowledged: int = 0
    retried_posts: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


def schedule(rng: random.Random, window: float, pipe: Pipeline,
             nodes: int) -> list[tuple[float, str, Callable[[], None]]]:
    """The faults, at seeded times spread over the window, in time order."""
    slots = sorted(rng.uniform(0.05, 0.95) * window for _ in range(5))
    plan: list[tuple[float, str, Callable[[], None]]] = []
    for t in slots:
        n = rng.randrange(nodes)
        plan.append((t, f"SIGKILL worker {n} (restarted)", lambda n=n: pipe.kill_worker(n)))
    plan.append((rng.uniform(0.10, 0.25) * window, "Redis killed -9 and restarted on its AOF",
                 pipe.crash_redis))
    plan.append((rng.uniform(0.30, 0.45) * window, "Postgres stopped for 15 s",
                 lambda: pipe.stop_postgres(15)))
    plan.append((rng.uniform(0.55, 0.70) * window, "subscriber refuses connections for 20 s",
                 lambda: pipe.refuse_subscriber(20)))
    return sorted(plan, key=lambda item: item[0])


def inject(plan: list[tuple[float, str, Callable[[], None]]], started: float,
           figures: Figures, errors: list[BaseException]) -> None:
    threads = []
    for at, label, action in plan:
        delay = started + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        figures.faults.append(f"{at:6.1f}s  {label}")
        thread = threading.Thread(target=_guarded, args=(action, errors), daemon=True)
        thread.start()  # outages overlap other faults, as they would
        threads.append(thread)
    for thread in threads:
        thread.join()


def _guarded(action: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        action()
    except BaseException as exc:  # reported at the end: a fault that failed voids the run
        errors.append(exc)


def load(pipe: Pipeline, bodies: list[bytes], window: float, figures: Figures,
         threads: int = 8) -> set[int]:
    """Post every body at an even pace over the window, each until it is acknowledged."""
    acknowledged: set[int] = set()
    lock = threading.Lock()
    started = time.monotonic()
    pace = window * 0.9 / max(1, len(bodies))
    url = pipe.ingest_url

    def post(index: int) -> None:
        session = local.session
        tries = 0
        while True:
            tries += 1
            try:
                status = session.post(url, data=bodies[index], timeout=10,
                                      headers={"Content-Type": "application/json"}).status_code
            except requests.RequestException:
                status = 0
            with lock:
                figures.answers[status] = figures.answers.get(status, 0) + 1
                if tries > 1:
                    figures.retried_posts += 1
            if 200 <= status < 300:
                with lock:
                    acknowledged.add(index)
                return
            time.sleep(min(2.0, 0.1 * tries))  # RD retries too

    local = threading.local()

    def run(part: int) -> None:
        local.session = requests.Session()
        for index in range(part, len(bodies), threads):
            due = started + index * pace
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            post(index)

    workers = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    figures.sent = len(bodies)
    figures.acknowledged = len(acknowledged)
    return acknowledged


def settle(pipe: Pipeline, timeout: float) -> None:
    """Wait for the stream to empty and every delivery to be delivered or dead."""
    import psycopg
    import redis

    client = redis.Redis.from_url(pipe.redis.url)
    shown = [0.0]

    def settled() -> bool:
        try:
            stream = client.xlen(pipe.stream_key)
            with psycopg.connect(pipe.postgres.url, connect_timeout=3) as conn:
                waiting = conn.execute(
                    "SELECT sink, count(*), count(*) FILTER (WHERE dispatched_at > now()) "
                    "FROM deliveries WHERE status = 'pending' GROUP BY sink").fetchall()
        except (redis.RedisError, psycopg.Error):
            return False
        if time.monotonic() - shown[0] > 10:  # a status line while it drains
            shown[0] = time.monotonic()
            parts = ", ".join(f"{sink.split(':')[0]} {n} ({later} scheduled)"
                              for sink, n, later in waiting)
            print(f"settling: stream {stream}; pending deliveries: {parts or 'none'}",
                  file=sys.stderr, flush=True)
        return stream == 0 and not waiting

    wait_until(settled, timeout, "the stream and every delivery to settle", interval=1)


def verify(pipe: Pipeline, dataset: Any, acked: set[int]) -> tuple[list[str], list[str]]:
    """The printed figures, and what failed (empty: PASS)."""
    import psycopg

    from sinks.email import message_id
    from sinks.webhook import webhook_id
    from workers import subscribers

    lines: list[str] = []
    failures: list[str] = []
    unique_acked = len({dataset.bodies[i] for i in acked})
    with psycopg.connect(pipe.postgres.url) as conn:
        def value(sql: str, *params: Any) -> int:
            row = conn.execute(sql, params or None).fetchone()
            return int(row[0] or 0) if row else 0

        events = value("SELECT count(*) FROM events")
        lines += [f"events rows: {events} (unique bodies acknowledged: {unique_acked}); "
                  f"duplicates counted: {value('SELECT sum(duplicates) FROM events')}",
                  f"leads rows: {value('SELECT count(*) FROM leads')}, deals rows: "
                  f"{value('SELECT count(*) FROM deals')}, quarantined: "
                  f"{value('SELECT count(*) FROM quarantine')}"]
        if events != unique_acked or events != dataset.unique:
            failures.append(f"events {events} != unique acknowledged {unique_acked}")
        if value("SELECT count(*) FROM quarantine"):
            failures.append("bodies were quarantined")
        if value("SELECT count(*) FROM deliveries WHERE status = 'pending'"):
            failures.append("deliveries still pending")

        def routed(sink_sql: str, *params: Any) -> dict[str, str]:
            return {k: s for k, s in conn.execute(
                "SELECT e.dedup_key, d.status FROM deliveries d JOIN events e "
                f"ON e.id = d.event_id WHERE {sink_sql}", params or None)}

        sub = conn.execute("SELECT uuid FROM subscriptions").fetchone()[0]
        checks = [
            ("CRM", pipe.crm.applied, routed("d.sink = 'crm'"), lambda k: k),
            ("subscriber", pipe.subscriber.applied,
             routed("d.sink = %s", subscribers.target(sub)), webhook_id),
            ("e-mail", _mailbox(pipe), routed("d.sink = 'sales-email'"),
             lambda k: message_id(k, "sales@example.com", "sales-email")),
        ]
        dead = value("SELECT count(*) FROM dead_letters")
        reasons = value("SELECT count(*) FROM dead_letters WHERE error <> ''")
        for name, applied, expected, key_of in checks:
            wanted = {key_of(k): status for k, status in expected.items()}
            delivered = sum(1 for s in wanted.values() if s == "delivered")
            dead_here = sum(1 for s in wanted.values() if s == "dead")
            missing = [k for k, s in wanted.items() if s == "delivered" and k not in applied]
            stray = [k for k in applied if k not in wanted]
            repeats = sum(n - 1 for n in applied.values())
            lines.append(f"{name}: routed {len(wanted)}, applied {len(applied)} "
                         f"(delivered {delivered}, dead letters {dead_here}), repeats seen and "
                         f"deduplicated {repeats}, duplicate side effects {len(stray)}")
            if missing:
                failures.append(f"{name}: {len(missing)} delivered but never applied")
            if stray:
                failures.append(f"{name}: {len(stray)} keys applied that match no event")
        lines.append(f"dead letters: {dead} (each with its reason: {reasons == dead})")
        if reasons != dead:
            failures.append("a dead letter without a reason")
    return lines, failures


def _mailbox(pipe: Pipeline) -> dict[str, int]:
    seen: dict[str, int] = {}
    for message in pipe.smtp.messages:
        mid = message.message["Message-ID"]
        seen[mid] = seen.get(mid, 0) + 1
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--window", type=float, default=300.0,
                        help="seconds over which the events are posted and faults happen")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="Celery processes per worker node (deliveries wait on receivers)")
    parser.add_argument("--crm-timeout", type=float, default=2.0,
                        help="the crm sink's timeout; the CRM's hangs last one second longer")
    parser.add_argument("--settle", type=float, default=600.0,
                        help="longest wait for the queues to drain after the load")
    args = parser.parse_args(argv)
    print(f"configuration: {args.events} events (10 % duplicates) over {args.window:.0f} s, "
          f"seed {args.seed}, {args.nodes} worker nodes x {args.concurrency} processes, "
          f"API granian x 2, crm timeout {args.crm_timeout:g} s")
    print_versions(("python", "redis-server", "postgres", "celery", "redis-py", "psycopg",
                    "granian"), machine())
    rng = random.Random(args.seed)
    dataset = build(args.events, 0.10, args.seed)
    errors: list[BaseException] = []
    figures = Figures()
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="leadpipe-chaos-") as tmp:
        crm = Receiver("Idempotency-Key", fail=0.30, hang=0.05,
                       hang_seconds=args.crm_timeout + 1.0,
                       seed=args.seed)
        subscriber = Receiver("webhook-id", seed=args.seed + 1)
        pipe = Pipeline(Path(tmp), crm, subscriber, "chaos", settings=CHAOS_SETTINGS,
                        crm_timeout=args.crm_timeout)
        try:
            pipe.start([Node(args.concurrency)] * args.nodes)
            plan = schedule(rng, args.window, pipe, args.nodes)
            started = time.monotonic()
            injector = threading.Thread(target=inject, args=(plan, started, figures, errors),
                                        daemon=True)
            injector.start()
            acked = load(pipe, dataset.bodies, args.window, figures)
            injector.join()
            loaded = time.monotonic() - started
            settle(pipe, args.settle)
            drained = time.monotonic() - started
            lines, failures = verify(pipe, dataset, acked)
            failures += [f"{name} stopped on its own during the run (exit code {code})"
                         for name, code in pipe.exited()]
        except BaseException:
            for name in ("api", "worker-0", "worker-1"):
                print(f"--- {name}.log\n{tail(Path(tmp) / f'{name}.log', 20)}", file=sys.stderr)
            raise
        finally:
            pipe.stop()
    failures += [f"a fault could not be injected: {exc!r}" for exc in errors]
    print("faults:")
    for line in figures.faults:
        print(f"  {line}")
    print(f"load: {figures.sent} bodies posted in {loaded:.1f} s, {figures.acknowledged} "
          f"acknowledged with 2xx; retried posts {figures.retried_posts}; answers "
          f"{dict(sorted(figures.answers.items()))}")
    print(f"settled {drained - loaded:.1f} s after the load")
    for line in lines:
        print(line)
    if failures:
        print("result: FAIL")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print("result: PASS")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        sys.exit(2)
