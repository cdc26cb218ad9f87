"""End to end, sustained: a fixed POST rate through every sink, and how late each event arrives.

    python -m bench.sustained [--rates 500,1000,1500] [--duration 300]

One pipeline of real processes (bench.pipeline): Redis (AOF, appendfsync always), Postgres
(track_commit_timestamp on), `leadpipe api` (granian), worker nodes — by default one storing
node (`--queues <ns>.ingest,<ns>.default`) and one delivering node (the sinks' and the
subscriptions' queues), as docs/SCALING.md recommends — a CRM (local HTTP server, keep-alive),
an SMTP server (aiosmtpd) and one WEBHOOK.CONVERTED subscriber. Every event goes to the CRM and
to Postgres, opportunities also by e-mail, conversions also to the subscriber.

For each rate, bench.loadgen (a process of its own) posts bodies built from the fixtures (unique
ids, 10 % exact duplicates) at that fixed rate for --duration seconds, open loop: each request
is timed from the moment it was due. Every --sample seconds the backlog is read: stream entries
not yet stored plus deliveries not yet made. The rate is "bounded" when the generator kept pace,
every POST got a 2xx, and the backlog grew by less than 2 % of the arrival rate over the second
half of the window. After the load, everything settles (stream empty, no pending delivery)
before the next rate.

Latencies come from timestamps, per event: its POST's due moment (the generator's clock),
the commit time of the transaction that stored its `events` row (Postgres's
pg_xact_commit_timestamp; rows later touched by a duplicate are left out), and the first 2xx
each receiver gave for its idempotency key (CRM, subscriber) or Message-ID (e-mail). All the
clocks are this machine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench import (
    BenchError,
    machine,
    positive_list,
    print_versions,
    terminate_as_interrupt,
    tree_cpu_seconds,
    tree_memory_bytes,
    wait_until,
)
from bench.drain import build
from bench.pipeline import Node, Pipeline
from bench.receivers import Receiver

TARGET_RATE, TARGET_P99 = 1_500, 1.0  # events/s sustained, seconds POST -> Postgres (issue 7)
GROWTH_LIMIT = 0.02  # backlog growth allowed over the second half, as a share of the rate


@dataclass
class Sample:
    at: float  # seconds since the load started
    stream: int  # entries on the stream (not yet stored)
    deliveries: int  # deliveries not yet made
    memory: dict[str, int] = field(default_factory=dict)  # part -> bytes, when sampled

    @property
    def backlog(self) -> int:
        return self.stream + self.deliveries


@dataclass
class Step:
    rate: float
    duration: float
    rows: list[list] = field(default_factory=list)  # bench.loadgen's rows
    samples: list[Sample] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    settled: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    generator: str = ""

    @property
    def sent(self) -> int:
        return len(self.rows)

    @property
    def answers(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for row in self.rows:
            counts[row[4]] = counts.get(row[4], 0) + 1
        return dict(sorted(counts.items()))

    @property
    def late(self) -> float:
        return max((row[2] - row[1] for row in self.rows), default=0.0)

    def growth(self) -> float:
        """Backlog growth per second over the second half of the load (least squares)."""
        half = [s for s in self.samples if s.at >= self.duration / 2]
        return slope([(s.at, s.backlog) for s in half])

    def bounded(self, expected: int) -> bool:
        return (self.sent == expected and self.late < 1.0
                and all(200 <= status < 300 for status in self.answers)
                and self.growth() < GROWTH_LIMIT * self.rate)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Watcher:
    """Reads the backlog (and memory) while the load runs; prints a status line every 10 s."""

    def __init__(self, pipe: Pipeline, every: float, memory_every: float | None):
        import psycopg
        import redis

        self.pipe = pipe
        self.every = every
        self.memory_every = memory_every
        self.client = redis.Redis.from_url(pipe.redis.url)
        self.db = psycopg.connect(pipe.postgres.url, autocommit=True)
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def read(self, at: float, memory: bool = False) -> Sample:
        stream = int(self.client.xlen(self.pipe.stream_key))
        row = self.db.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()
        sample = Sample(at, stream, int(row[0]) if row else 0)
        if memory:
            sample.memory = {part: sum(tree_memory_bytes(pid) for pid in pids)
                          for part, pids in self.pipe.roots().items()}
        return sample

    def start(self, started: float) -> None:
        def loop() -> None:
            shown = last_memory = -1e9
            try:
                while not self.stop.is_set():
                    at = time.monotonic() - started
                    memory = (self.memory_every is not None
                              and at - last_memory >= self.memory_every - 0.01)
                    if memory:
                        last_memory = at
                    sample = self.read(at, memory)
                    self.samples.append(sample)
                    self.pipe.check_alive()
                    if at - shown >= 10:
                        shown = at
                        print(f"  {at:5.0f} s  stream {sample.stream}, deliveries pending "
                              f"{sample.deliveries}", file=sys.stderr, flush=True)
                    self.stop.wait(self.every)
            except BaseException as exc:  # reported by the main thread
                self.errors.append(exc)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def finish(self) -> list[Sample]:
        self.stop.set()
        if self.thread:
            self.thread.join()
        if self.errors:
            raise self.errors[0]
        return self.samples

    def settle(self, timeout: float) -> float:
        started = time.monotonic()
        def settled() -> bool:
            self.pipe.check_alive()  # raises when a part died: nothing would settle then
            return self.read(0).backlog == 0

        wait_until(settled, timeout, "the stream and every delivery to settle", interval=0.2)
        return time.monotonic() - started

    def close(self) -> None:
        self.client.close()
        self.db.close()


def run_step(pipe: Pipeline, root: Path, rate: float, duration: float, seed: int, offset: int,
             connections: int, every: float, memory_every: float | None,
             settle_timeout: float) -> Step:
    """Post at `rate` for `duration` seconds, watch, settle, and read every event's times."""
    total = max(1, round(rate * duration))
    data = build(total, 0.10, seed, offset=offset)
    bodies = root / f"bodies-{offset}.jsonl"
    bodies.write_bytes(b"\n".join(data.bodies) + b"\n")
    out = root / f"rows-{offset}.json"
    step = Step(rate, duration)
    watcher = Watcher(pipe, every, memory_every)
    try:
        roots = pipe.roots()
        cpu0 = {part: sum(tree_cpu_seconds(p) for p in pids) for part, pids in roots.items()}
        own0 = time.process_time()
        started = time.monotonic()
        generator = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--url", pipe.ingest_url, "--rate",
             str(rate), "--bodies", str(bodies), "--out", str(out), "--connections",
             str(connections)], stderr=subprocess.PIPE, text=True)
        watcher.start(started)
        gen_cpu = 0.0
        while generator.poll() is None:
            gen_cpu = tree_cpu_seconds(generator.pid) or gen_cpu
            time.sleep(0.5)
        step.generator = (generator.stderr.read() if generator.stderr else "").strip()
        if generator.returncode != 0:
            raise BenchError(f"bench.loadgen failed: {step.generator}")
        step.samples = watcher.finish()
        step.cpu = {part: sum(tree_cpu_seconds(p) for p in pids) - cpu0[part]
                    for part, pids in roots.items()}
        step.cpu["load generator"] = gen_cpu
        step.cpu["receivers (CRM, subscriber, SMTP)"] = time.process_time() - own0
        step.rows = orjson.loads(out.read_bytes())
        step.settled = watcher.settle(settle_timeout)
        step.latencies = latencies(pipe, step.rows)
    finally:
        watcher.close()
    return step


def latencies(pipe: Pipeline, rows: list[list]) -> dict[str, list[float]]:
    """Seconds from each acknowledged POST's due moment to its arrival at each store."""
    import psycopg

    from sinks.crm import idempotency_key
    from sinks.email import message_id
    from sinks.webhook import webhook_id

    due = {row[5]: row[1] for row in rows if row[5]}
    found: dict[str, list[float]] = {"Postgres": [], "CRM": [], "subscriber": [], "e-mail": []}
    mail: dict[str, float] = {}
    for message in pipe.smtp.messages:
        mail.setdefault(message.message["Message-ID"], message.at)
    with psycopg.connect(pipe.postgres.url) as conn:
        stored = conn.execute(
            "SELECT id, dedup_key, extract(epoch FROM pg_xact_commit_timestamp(xmin)), "
            "duplicates FROM events WHERE id = ANY(%s)", (list(due),)).fetchall()
    for event_id, dedup_key, committed, duplicates in stored:
        posted = due[event_id]
        if committed is not None and not duplicates:
            found["Postgres"].append(float(committed) - posted)
        for name, when in (
                ("CRM", pipe.crm.first_applied.get(idempotency_key(dedup_key))),
                ("subscriber", pipe.subscriber.first_applied.get(webhook_id(dedup_key))),
                ("e-mail", mail.get(message_id(dedup_key, "sales@example.com", "sales-email")))):
            if when is not None:
                found[name].append(when - posted)
    return found


def cpu_line(step: Step) -> str:
    wall = step.duration * (os.cpu_count() or 1)
    parts = sorted(step.cpu.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{part} {seconds:.0f} s ({seconds / wall:.0%})" for part, seconds in parts)


def report(step: Step, expected: int) -> list[str]:
    achieved = step.sent / step.duration
    peak = max((s.backlog for s in step.samples), default=0)
    lines = [
        f"rate {step.rate:.0f}/s for {step.duration:.0f} s: sent {step.sent} of {expected} "
        f"({achieved:.0f}/s), answers {step.answers}, largest send delay "
        f"{1000 * step.late:.0f} ms",
        f"  backlog (stream + pending deliveries): peak {peak}, growth over the second half "
        f"{step.growth():+.1f}/s -> {'BOUNDED' if step.bounded(expected) else 'NOT bounded'}; "
        f"settled {step.settled:.1f} s after the load",
    ]
    ingest = [row[3] - row[1] for row in step.rows if 200 <= row[4] < 300]
    lines.append(f"  POST answered (2xx)  p50 {1000 * percentile(ingest, 0.5):7.1f} ms   p99 "
                 f"{1000 * percentile(ingest, 0.99):7.1f} ms   n {len(ingest)}")
    for name, values in step.latencies.items():
        lines.append(f"  POST -> {name:<12} p50 {1000 * percentile(values, 0.5):7.1f} ms   p99 "
                     f"{1000 * percentile(values, 0.99):7.1f} ms   n {len(values)}")
    lines.append(f"  cpu over the load ({os.cpu_count()} CPUs x {step.duration:.0f} s): "
                 f"{cpu_line(step)}")
    return lines


def topology(args: argparse.Namespace) -> list[Node]:
    if args.deliver_nodes == 0:
        return [Node(args.store_concurrency)] * args.store_nodes
    return ([Node(args.store_concurrency, "store")] * args.store_nodes
            + [Node(args.deliver_concurrency, "deliver")] * args.deliver_nodes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=300.0, help="seconds per rate (300)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--store-nodes", type=int, default=1)
    parser.add_argument("--store-concurrency", type=int, default=1)
    parser.add_argument("--deliver-nodes", type=int, default=1,
                        help="nodes serving only the delivery queues (0: every node serves all)")
    parser.add_argument("--deliver-concurrency", type=int, default=4)
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between backlog reads")
    parser.add_argument("--settle", type=float, default=600.0,
                        help="longest wait for the backlog to clear after a rate")
    parser.add_argument("--log-level", default="WARNING", help="the pipeline's (WARNING)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a LEADPIPE_ setting for the API and workers, e.g. "
                             "BATCH_WINDOW_MS=200 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")


def _setting(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
    return name.upper().removeprefix("LEADPIPE_"), value


class Bench:
    """A pipeline started for a benchmark, stopped (and its folder removed) on the way out."""

    def __init__(self, args: argparse.Namespace, name: str):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix=f"leadpipe-bench-{name}-"))
        self.root.chmod(0o755)  # as root, Postgres runs as `postgres` and must reach it
        crm = Receiver("Idempotency-Key", keep_alive=True)
        subscriber = Receiver("webhook-id", keep_alive=True, seed=1)
        self.pipe = Pipeline(self.root, crm, subscriber, "bench", args.api_workers,
                             settings={"LOG_LEVEL": args.log_level.upper(),
                                       **dict(_setting(item) for item in args.set)},
                             postgres_settings={"track_commit_timestamp": "on"})
        self.offset = 0

    def describe(self, machine_text: str) -> None:
        a = self.args
        nodes = (f"{a.store_nodes} storing node(s) x {a.store_concurrency} process(es) + "
                 f"{a.deliver_nodes} delivering node(s) x {a.deliver_concurrency}"
                 if a.deliver_nodes else
                 f"{a.store_nodes} node(s) x {a.store_concurrency} process(es), every queue")
        print("configuration")
        print(f"  api          `leadpipe api --workers {a.api_workers}` (granian)")
        print(f"  workers      {nodes}")
        if a.set:
            print(f"  settings     {', '.join(a.set)}")
        print("  sinks        Postgres and CRM (every event; local HTTP server, keep-alive), "
              "e-mail (opportunities; aiosmtpd), subscriber (conversions; local HTTP server)")
        print(f"  load         bench.loadgen, open loop, {a.connections} connections; bodies "
              "from the fixtures, unique ids, 10 % exact duplicates")
        print_versions(["python", "redis-server", "postgres", "celery", "redis-py", "psycopg",
                        "granian"], machine_text)
        sys.stdout.flush()

    def start(self) -> None:
        self.pipe.start(topology(self.args), quick_retries=False)
        self.warm()

    def warm(self) -> None:
        """A few hundred events through every sink first: imports, connections, caches."""
        self.step(200.0, 1.0, memory_every=None)

    def step(self, rate: float, duration: float, memory_every: float | None) -> Step:
        step = run_step(self.pipe, self.root, rate, duration, self.args.seed + self.offset,
                        self.offset * 10_000_000 + 1, self.args.connections,
                        self.args.sample, memory_every, self.args.settle)
        self.offset += 1
        return step

    def close(self) -> None:
        self.pipe.stop()
        if self.args.keep:
            print(f"kept {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sustained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=[1500.0], type=positive_list(float),
                        help="comma-separated POST rates to hold, in order (1500)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    rates = args.rates
    print("bench.sustained: a fixed POST rate through every sink")
    machine_text = machine()
    bench = Bench(args, "sustained")
    results: list[tuple[Step, bool, float]] = []
    try:
        with terminate_as_interrupt():
            bench.describe(machine_text)
            bench.start()
            for rate in rates:
                print(f"holding {rate:.0f}/s for {args.duration:.0f} s", file=sys.stderr,
                      flush=True)
                step = bench.step(rate, args.duration, memory_every=None)
                expected = max(1, round(rate * args.duration))
                for line in report(step, expected):
                    print(line, flush=True)
                p99 = percentile(step.latencies["Postgres"], 0.99)
                results.append((step, step.bounded(expected), p99))
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.sustained: {exc}", file=sys.stderr)
        for name in ("api", "worker-0", "worker-1"):
            print(f"--- {name}.log\n{bench.pipe.log(name)}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    held = [(s.rate, p99) for s, ok, p99 in results if ok]
    if held:
        best, p99 = max(held)
        print(f"highest rate held (bounded backlog): {best:.0f} events/s, p99 POST -> Postgres "
              f"{1000 * p99:.0f} ms")
        met = best >= TARGET_RATE and p99 <= TARGET_P99
        print(f"target (issue 7) >= {TARGET_RATE} events/s with p99 POST -> Postgres <= "
              f"{TARGET_P99:.0f} s: {'met' if met else 'NOT met'}")
    else:
        print("highest rate held (bounded backlog): none of the rates tried")
    return 0


if __name__ == "__main__":
    sys.exit(main())
