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

PASS: every acknowledged unique event is in `events` exactly once; each one a sink routes to
was applied by that receiver under exactly one key, or sits in dead letters with a reason; no
receiver applied a key that belongs to no event; nothing pending; nothing quarantined.
"""

from __future__ import annotations

import argparse
import os
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
import yaml

from bench import (
    BenchError,
    Processes,
    machine,
    print_versions,
    tail,
    terminate_as_interrupt,
    wait_until,
)
from bench.drain import build
from bench.receivers import Receiver
from config.local import LocalPostgres, LocalRedis, free_port
from config.settings import PREFIX

TOKEN = "chaos-ingest-token-0123456789"


@dataclass
class Figures:
    sent: int = 0
    acknowledged: int = 0
    retried_posts: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


class Pipeline:
    """The processes of one run and how to hurt them."""

    def __init__(self, root: Path, seed: int, concurrency: int = 4):
        self.root = root
        self.procs = Processes()
        self.redis = LocalRedis(root / "redis", port=free_port())
        self.postgres = LocalPostgres(root / "postgres", port=free_port())
        self.crm = Receiver("Idempotency-Key", fail=0.30, hang=0.05, hang_seconds=3.0,
                            seed=seed)
        self.subscriber = Receiver("webhook-id", seed=seed + 1)
        self.smtp: Any = None
        self.api_port = free_port()
        self.env: dict[str, str] = {}
        self.workers: list[Any] = []
        self.concurrency = concurrency

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, nodes: int) -> None:
        from sinks.db import migrate
        from tests.support.smtp_server import SmtpServer

        self.redis.start()
        self.postgres.start()
        migrate(self.postgres.url)
        self.crm.listen()
        self.subscriber.listen()
        self.smtp = SmtpServer().start()
        routes = self.root / "routes.yaml"
        quick = {"retry_schedule": [1, 2, 4, 8, 15, 15, 15, 15, 15, 15], "quick_retries": 2,
                 "circuit_breaker": {"failures": 50, "cooldown": 1}}
        routes.write_text(yaml.safe_dump({
            "sinks": {
                "crm": {"type": "crm", "options": {"base_url": self.crm.url,
                                                   "auth_value": "Bearer chaos",
                                                   "timeout": 2}, **quick},
                "sales-email": {"type": "email", "options": {
                    "host": "127.0.0.1", "port": self.smtp.port, "security": "none",
                    "from": "leadpipe@example.com", "to": ["sales@example.com"]}, **quick},
            },
            "routes": [{"name": "everything to the CRM", "to": ["crm"]},
                       {"name": "opportunities by e-mail", "to": ["sales-email"],
                        "when": {"event_type": ["WEBHOOK.MARKED_OPPORTUNITY"]}}],
        }))
        settings = {"REDIS_URL": self.redis.url, "DATABASE_URL": self.postgres.url,
                    "INGEST_TOKENS": TOKEN, "ROUTES_FILE": str(routes), "NAMESPACE": "chaos",
                    "CLAIM_IDLE_SECONDS": "5", "RELAY_AFTER_SECONDS": "10",
                    "VISIBILITY_TIMEOUT_SECONDS": "45", "SSRF_ALLOW": "127.0.0.1",
                    "SUBSCRIPTION_SUSPEND_AFTER": "1000000", "LOG_LEVEL": "WARNING"}
        self.env = {**os.environ, **{PREFIX + k: v for k, v in settings.items()}}
        self.procs.start("api", [sys.executable, "-m", "config.cli", "api", "--port",
                                 str(self.api_port), "--workers", "2"],
                         self.root / "api.log", env=self.env)
        wait_until(self._api_up, 60, "the API")
        for n in range(nodes):
            self.workers.append(self._worker(n))
        self._subscribe()

    def _api_up(self) -> bool:
        try:
            return requests.get(self.api + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _worker(self, n: int) -> Any:
        return self.procs.start(f"worker-{n}", [sys.executable, "-m", "config.cli", "worker",
                                                "--concurrency", str(self.concurrency)],
                                self.root / f"worker-{n}.log", env=self.env)

    def _subscribe(self) -> None:
        from ingest import tokens

        token = tokens.create(self.postgres.url, "chaos")
        answer = requests.post(self.api + "/integrations/webhooks", timeout=10, json={
            "event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
            "url": self.subscriber.url + "/hook", "http_method": "POST"},
            headers={"Authorization": f"Bearer {token}"})
        if answer.status_code != 201:
            raise BenchError(f"could not subscribe: {answer.status_code} {answer.text}")

    # -- faults --------------------------------------------------------------------------------

    def kill_worker(self, n: int) -> None:
        import signal

        self.procs.stop(self.workers[n], signal.SIGKILL, timeout=5)
        self.workers[n] = self._worker(n)

    def crash_redis(self) -> None:
        self.redis.stop(kill=True)
        time.sleep(1)
        self.redis.start()  # the same folder: it replays its AOF

    def stop_postgres(self, seconds: float) -> None:
        self.postgres.stop()
        time.sleep(seconds)
        self.postgres.start()

    def refuse_subscriber(self, seconds: float) -> None:
        self.subscriber.refuse()
        time.sleep(seconds)
        self.subscriber.listen()

    def stop(self) -> None:
        self.procs.stop_all()
        for server in (self.crm, self.subscriber):
            server.refuse()
        if self.smtp is not None:
            self.smtp.stop()
        self.postgres.stop()
        self.redis.stop()


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
    url = pipe.api + f"/webhooks/rdstation?token={TOKEN}"

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
            stream = client.xlen("chaos:ingest")
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
             lambda k: message_id(k, "sales@example.com")),
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
    parser.add_argument("--settle", type=float, default=600.0,
                        help="longest wait for the queues to drain after the load")
    args = parser.parse_args(argv)
    print(f"configuration: {args.events} events (10 % duplicates) over {args.window:.0f} s, "
          f"seed {args.seed}, {args.nodes} worker nodes x {args.concurrency} processes, "
          "API granian x 2")
    print_versions(("python", "redis-server", "postgres", "celery", "redis-py", "psycopg",
                    "granian"), machine())
    rng = random.Random(args.seed)
    dataset = build(args.events, 0.10, args.seed)
    errors: list[BaseException] = []
    figures = Figures()
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="leadpipe-chaos-") as tmp:
        pipe = Pipeline(Path(tmp), args.seed, args.concurrency)
        try:
            pipe.start(args.nodes)
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
