"""Drain: how fast the workers turn a backlog on the Redis stream into Postgres rows.

    python -m bench.drain [--events 50000] [--nodes 2 --concurrency 1] [--profile]

Starts a LocalRedis and a LocalPostgres in a temporary folder, migrates, and builds N stream
entries from the seven event fixtures in ../shared/fixtures/rdstation (mkt-v2-*, legacy-leads-*,
crm-deal-*), each made unique (contact uuid/e-mail, lead id, deal id, transaction_uuid,
timestamps), plus 10 % exact duplicates of some of them, shuffled with a fixed seed. Entries are
written with ingest.queue.IngestStream.append and new_event_id, exactly as the endpoint does.

Timing ("paused" start, so worker boot is excluded): the worker nodes are started first and
warmed with a small separate set of events (stored, checked, then the tables are truncated);
then the whole backlog is appended to a stream of its own (with the workers' group) and renamed
over the ingest stream in one command, so the pumps, blocked in XREADGROUP, see all of it at
once and this process does nothing meanwhile. The clock starts just before the rename and stops
when the stream is empty
(a batch is XACK+XDEL'd only after its Postgres transaction committed), and the rows are then
verified: events == unique entries, sum(events.duplicates) == duplicates, leads and deals as
expected, quarantine empty.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from bench import (
    FIXTURES,
    BenchError,
    Processes,
    machine,
    print_versions,
    tail,
    terminate_as_interrupt,
    tree_cpu_seconds,
    wait_until,
)
from config.local import LocalPostgres, LocalRedis, free_port
from config.settings import PREFIX, Settings

FIXTURE_NAMES = (
    "mkt-v2-converted.json", "mkt-v2-marked-opportunity.json",
    "legacy-leads-full.json", "legacy-leads-official.json",
    "crm-deal-created.json", "crm-deal-deleted.json", "crm-deal-updated-won.json",
)
NAMESPACE = uuid.UUID("6f1c3c52-3d0e-4a57-9b1e-2f6a0c0b7d11")
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
IDLE_FRAMES = ("Condition.wait ", "Event.wait ", "_epoll.poll ", "poll ", "select ",
               "Connection._recv (billiard")  # threads parked, not working
PROJECT_CODE = ("workers/", "sinks/", "ingest/")  # frames shown in the inclusive profile
TARGET, LATER_TARGET = 5_000, 10_000  # stored events per second (issue 2, later)


@dataclass
class Dataset:
    """Stream bodies ready to append, and the rows they must produce."""

    bodies: list[bytes]
    unique: int
    duplicates: int
    leads: int
    deals: int
    per_fixture: Counter = field(default_factory=Counter)


def _when(i: int, zulu: bool = False) -> str:
    moment = BASE_TIME + timedelta(seconds=i, milliseconds=i % 1000)
    if zulu:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.astimezone().isoformat(timespec="milliseconds")


def unique_body(template: dict[str, Any], name: str, i: int) -> dict[str, Any]:
    """A copy of a fixture that is a different event (and lead or deal) for every `i`."""
    data = copy.deepcopy(template)
    uid = str(uuid.uuid5(NAMESPACE, f"{name}:{i}"))
    email = f"lead{i}@bench.example.com"
    if name.startswith("mkt-v2-"):
        contact = data["contact"]
        contact["uuid"] = uid
        contact["email"] = email
        data["event_timestamp"] = _when(i)
        data["timestamp"] = _when(i + 1)
    elif name.startswith("legacy-leads-"):
        lead = data["leads"][0]
        lead["id"] = str(10_000_000 + i)
        lead["uuid"] = uid
        lead["email"] = email
        lead["public_url"] = f"http://app.rdstation.com.br/leads/public/{uid}"
        lead["last_conversion"]["created_at"] = _when(i)
        lead["last_conversion"]["content"]["email_lead"] = email
        if "last_marked_opportunity_date" in lead:
            lead["last_marked_opportunity_date"] = _when(i + 1)
    elif name.startswith("crm-deal-"):
        data["transaction_uuid"] = uid
        data["document"]["id"] = f"bench{i:019x}"
        data["event_timestamp"] = _when(i, zulu=True)
    else:
        raise ValueError(f"no rule to make {name} unique")
    return data


def build(n: int, duplicate_share: float, seed: int, offset: int = 0) -> Dataset:
    """`n` entries: n - round(n * share) unique events and the rest exact duplicates of them."""
    templates = {name: orjson.loads((FIXTURES / name).read_bytes()) for name in FIXTURE_NAMES}
    rng = random.Random(seed)
    duplicates = round(n * duplicate_share)
    unique = n - duplicates
    if unique <= 0:
        raise BenchError("--events too small for the duplicate share")
    bodies: list[bytes] = []
    kinds: Counter = Counter()
    for i in range(unique):
        name = FIXTURE_NAMES[i % len(FIXTURE_NAMES)]
        kinds[name] += 1
        bodies.append(orjson.dumps(unique_body(templates[name], name, offset + i)))
    picks = (rng.sample(range(unique), duplicates) if duplicates <= unique
             else [rng.randrange(unique) for _ in range(duplicates)])
    entries = bodies + [bodies[j] for j in picks]
    rng.shuffle(entries)
    leads = sum(c for k, c in kinds.items() if not k.startswith("crm-"))
    deals = sum(c for k, c in kinds.items() if k.startswith("crm-deal-"))
    return Dataset(entries, unique, duplicates, leads, deals, kinds)


def append_all(client, key: str, bodies: list[bytes], staged: bool,  # type: ignore[no-untyped-def]
               before: Callable[[], None] | None = None) -> tuple[float, float]:
    """Append every body as the endpoint would. `staged`: to a stream of its own (with the
    workers' group), then renamed over `key` in one command, so the whole backlog appears to
    the workers at once, and this process has nothing left to do meanwhile (parsing the reply
    of a 50,000-entry EXEC took it half a second while the workers were already storing).
    Returns the seconds it took and when (time.time()) the backlog appeared; `before` runs
    just before that."""
    from ingest.queue import GROUP, IngestStream, new_event_id

    started = time.perf_counter()
    target = f"{key}:staged" if staged else key
    pipe = client.pipeline(transaction=False)
    stream = IngestStream(pipe, target)
    for body in bodies:
        stream.append(new_event_id(), body)
    if staged:
        pipe.xgroup_create(target, GROUP, id="0")
    pipe.execute()
    if before is not None:
        before()
    appeared = time.time()  # the rename's round trip counts as the drain's
    if staged:
        client.rename(target, key)  # blocked XREADGROUPs are served at once
    return time.perf_counter() - started, appeared


class Postgres:
    """Small helpers over one autocommit connection of the benchmark itself."""

    def __init__(self, url: str):
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def value(self, sql: str) -> int:
        row = self.conn.execute(sql).fetchone()
        return int(row[0] or 0) if row else 0

    def counts(self) -> dict[str, int]:
        return {
            "events": self.value("SELECT count(*) FROM events"),
            "duplicates": self.value("SELECT coalesce(sum(duplicates), 0) FROM events"),
            "leads": self.value("SELECT count(*) FROM leads"),
            "deals": self.value("SELECT count(*) FROM deals"),
            "quarantine": self.value("SELECT count(*) FROM quarantine"),
        }

    def close(self) -> None:
        self.conn.close()


def start_workers(procs: Processes, args: argparse.Namespace, env: dict[str, str],
                  client, key: str, logs: Path) -> list[subprocess.Popen]:  # type: ignore[no-untyped-def]
    import redis

    nodes = []
    for n in range(args.nodes):
        cmd = [sys.executable, "-m", "config.cli", "worker", "--concurrency",
               str(args.concurrency)]
        nodes.append(procs.start(f"worker-{n}", cmd, logs / f"worker-{n}.log", env=env))

    def pumps_ready() -> bool:
        for n, proc in enumerate(nodes):
            if proc.poll() is not None:
                raise BenchError(f"worker {n} exited with code {proc.returncode}:\n"
                                 f"{tail(logs / f'worker-{n}.log')}")
        try:
            names = {c["name"].decode().rsplit(":", 1)[-1]
                     for c in client.xinfo_consumers(key, "workers")}
        except redis.ResponseError:
            return False
        return all(str(proc.pid) in names for proc in nodes)

    wait_until(pumps_ready, 120, "the worker nodes' pumps")
    return nodes


def wait_drained(client, key: str, total: int, timeout: float,  # type: ignore[no-untyped-def]
                 nodes: list[subprocess.Popen], logs: Path,
                 since: float | None = None) -> tuple[float, float | None]:
    """Seconds from `since` (time.time(); default now) until the stream is empty, and until
    the first batch was acknowledged."""
    started = time.time() if since is None else since
    first: float | None = None
    while True:
        depth = int(client.xlen(key))
        now = time.time() - started
        if first is None and depth < total:
            first = now
        if depth == 0:
            return now, first
        if now > timeout:
            raise BenchError(f"stream still holds {depth} of {total} entries after "
                             f"{timeout:.0f}s; worker log:\n{tail(logs / 'worker-0.log')}")
        for n, proc in enumerate(nodes):
            if proc.poll() is not None:
                raise BenchError(f"worker {n} exited with code {proc.returncode}:\n"
                                 f"{tail(logs / f'worker-{n}.log')}")
        time.sleep(0.01)


class Profiler:
    """py-spy recording one worker node and its pool children for the measured drain."""

    def __init__(self, pid: int, out: Path, log: Path):
        self.out = out
        binary = shutil.which("py-spy")
        if not binary:
            raise BenchError("--profile needs py-spy: pip install py-spy")
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
                 "--rate", "200", "--nonblocking", "--output", str(out)],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        time.sleep(1.0)  # py-spy attaches to the processes before the clock starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def report(self, top: int = 25) -> None:
        if not self.out.exists():
            print("profile: py-spy wrote nothing (is ptrace allowed?)")
            return
        own: Counter = Counter()
        inclusive: Counter = Counter()
        total = idle = 0
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f for f in stack.split(";") if not f.startswith("process ")
                      and not f.startswith("thread ")]
            if not frames:
                continue
            if frames[-1].startswith(IDLE_FRAMES):
                idle += count
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
        if not total:
            print("profile: no samples")
            return
        print(f"profile (py-spy, one worker node and its pool: {total} busy samples, {idle} "
              "samples of threads parked in a wait left out; time waiting for a Redis or "
              "Postgres reply is counted)")
        print("  own time")
        for frame, count in own.most_common(top):
            print(f"    {100 * count / total:5.1f}%  {frame}")
        print("  inclusive time, project code")
        shown = 0
        for frame, count in inclusive.most_common():
            if any(part in frame for part in PROJECT_CODE):
                print(f"    {100 * count / total:5.1f}%  {frame}")
                shown += 1
                if shown >= top:
                    break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50_000,
                   help="stream entries to drain, duplicates included (50000)")
    p.add_argument("--duplicates", type=float, default=0.10,
                   help="share of entries that are exact duplicates (0.10)")
    p.add_argument("--seed", type=int, default=20240501)
    p.add_argument("--nodes", type=int, default=2, help="`leadpipe worker` processes (2)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="Celery pool processes per node (1)")
    p.add_argument("--batch-size", type=int, default=None, help="LEADPIPE_BATCH_SIZE")
    p.add_argument("--inflight", type=int, default=None, help="LEADPIPE_MAX_INFLIGHT_BATCHES")
    p.add_argument("--log-level", default="INFO", help="workers' LEADPIPE_LOG_LEVEL (INFO)")
    p.add_argument("--warm", type=int, default=140, help="warm-up events before timing (140)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--profile", action="store_true", help="py-spy one worker node")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="leadpipe-bench-drain-"))
    tmp.chmod(0o755)  # as root, Postgres runs as `postgres` and must reach its data folder
    procs = Processes()
    services: list[LocalRedis | LocalPostgres] = []
    client = None
    db: Postgres | None = None
    profiler: Profiler | None = None
    try:
        with terminate_as_interrupt():
            machine_text = machine()  # before our own set-up keeps the CPUs busy
            data = build(args.events, args.duplicates, args.seed)
            warm = build(args.warm, 0.0, args.seed + 1, offset=10**9) if args.warm else None
            redis_server = LocalRedis(tmp / "redis", port=free_port())
            services.append(redis_server)  # registered before start: stopped even if start fails
            redis_server.start()
            pg = LocalPostgres(tmp / "postgres", port=free_port())
            services.append(pg)
            pg.start()
            from ingest.queue import make_redis
            from sinks.db import migrate

            migrate(pg.url)
            overrides: dict[str, Any] = {"log_level": args.log_level.upper()}
            if args.batch_size:
                overrides["batch_size"] = args.batch_size
            if args.inflight:
                overrides["max_inflight_batches"] = args.inflight
            settings = Settings(redis_url=redis_server.url, database_url=pg.url,
                                namespace="bench", worker_concurrency=args.concurrency,
                                **overrides)
            env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
            env.update(settings.to_env())
            client = make_redis(redis_server.url, timeout=120)
            db = Postgres(pg.url)
            key = settings.stream_key

            print("bench.drain: Redis stream backlog -> Postgres")
            print("configuration")
            print(f"  workers      {args.nodes} x `python -m config.cli worker --concurrency "
                  f"{args.concurrency}` = {args.nodes} pump(s), "
                  f"{args.nodes * args.concurrency} Celery pool process(es)")
            print(f"  settings     batch_size {settings.batch_size}, batch_window_ms "
                  f"{settings.batch_window_ms}, max_inflight_batches "
                  f"{settings.max_inflight_batches}, log level {settings.log_level}, routes file "
                  f"{getattr(settings, 'routes_file', None) or 'none (Postgres only)'}")
            mix = ", ".join(f"{k.removesuffix('.json')} {v}"
                            for k, v in sorted(data.per_fixture.items()))
            print(f"  events       {args.events} entries = {data.unique} unique + "
                  f"{data.duplicates} exact duplicates ({args.duplicates:.0%}), seed "
                  f"{args.seed}, shuffled; unique per fixture: {mix}")
            print(f"  expected     events {data.unique}, leads {data.leads}, deals {data.deals}, "
                  f"duplicates {data.duplicates}, quarantine 0")
            print(f"  services     LocalRedis (AOF, appendfsync always), LocalPostgres "
                  f"(shared_buffers 256MB, fsync on), both on 127.0.0.1 in {tmp}")
            print("  timing       workers booted and warmed first; backlog appended in one "
                  "stream of its own, then renamed over the ingest stream in one command; clock "
                  "and CPU from just before the rename to an empty stream")
            print_versions(["python", "redis-server", "postgres", "celery", "redis-py",
                            "psycopg"], machine_text)
            sys.stdout.flush()

            booted = time.perf_counter()
            nodes = start_workers(procs, args, env, client, key, tmp)
            boot_s = time.perf_counter() - booted
            warm_s = 0.0
            if warm:
                started = time.perf_counter()
                append_all(client, key, warm.bodies, staged=False)
                wait_drained(client, key, len(warm.bodies), 120, nodes, tmp)
                warm_s = time.perf_counter() - started
                got = db.value("SELECT count(*) FROM events")
                if got != warm.unique:
                    raise BenchError(f"warm-up stored {got} events, expected {warm.unique}")
                db.conn.execute("TRUNCATE events, leads, deals, quarantine CASCADE")
            print(f"workers: {args.nodes} node(s) up in {boot_s:.1f} s; warm-up of "
                  f"{args.warm} events drained in {warm_s:.2f} s (not timed)", flush=True)

            if args.profile:
                profiler = Profiler(nodes[0].pid, tmp / "profile.txt", tmp / "py-spy.log")
            timeout = args.timeout or 120 + args.events / 500
            roots = {"workers": [n.pid for n in nodes], "postgres": [pg.proc.pid],
                     "redis": [redis_server.proc.pid]} if pg.proc and redis_server.proc else {}
            cpu0: dict[str, float] = {}

            def snapshot() -> None:  # before the rename: the workers start on it at once
                cpu0.update({k: sum(tree_cpu_seconds(p) for p in v) for k, v in roots.items()})

            load_s, appeared = append_all(client, key, data.bodies, staged=True,
                                          before=snapshot)
            elapsed, first = wait_drained(client, key, len(data.bodies), timeout, nodes, tmp,
                                          since=appeared)
            cpu = {k: sum(tree_cpu_seconds(p) for p in v) - cpu0[k] for k, v in roots.items()}
            if profiler:
                profiler.stop()
            counts = db.counts()
            pending = int(client.xpending(key, "workers")["pending"])

            print(f"preload: {len(data.bodies)} entries appended to a staged stream in "
                  f"{load_s:.2f} s (before the clock; the rename into place is inside it)")
            print(f"drain: {len(data.bodies)} entries in {elapsed:.2f} s (first batch "
                  f"acknowledged after {1000 * (first or 0):.0f} ms)")
            print(f"rate: {data.unique / elapsed:.0f} events/s (unique events stored), "
                  f"{len(data.bodies) / elapsed:.0f} entries/s (stream entries drained)")
            if cpu:
                print("cpu during the drain: " + ", ".join(
                    f"{k} {v:.1f} s ({1e6 * v / data.unique:.0f} us/event)" for k, v in cpu.items())
                    + f"; wall {elapsed:.1f} s x {os.cpu_count()} CPUs = "
                    f"{elapsed * (os.cpu_count() or 1):.1f} CPU-s available")
            print(f"rows: events {counts['events']}, leads {counts['leads']}, deals "
                  f"{counts['deals']}, duplicates counted {counts['duplicates']}, quarantine "
                  f"{counts['quarantine']}, stream length {client.xlen(key)}, pending {pending}")
            rate = data.unique / elapsed
            print(f"target (issue 2) >= {TARGET} events/s: "
                  f"{'met' if rate >= TARGET else 'NOT met'}; later >= {LATER_TARGET}: "
                  f"{'met' if rate >= LATER_TARGET else 'NOT met'}")
            expected = {"events": data.unique, "duplicates": data.duplicates,
                        "leads": data.leads, "deals": data.deals, "quarantine": 0}
            wrong = {k: (counts[k], v) for k, v in expected.items() if counts[k] != v}
            if pending:
                wrong["pending"] = (pending, 0)
            if profiler:
                profiler.report()
            if wrong:
                print("verification: FAILED: " + ", ".join(
                    f"{k} {got} (expected {want})" for k, (got, want) in wrong.items()))
                return 1
            print(f"verification: OK (events == {data.unique} unique exactly, duplicates == "
                  f"{data.duplicates}, leads == {data.leads}, deals == {data.deals}, "
                  "quarantine empty, stream empty)")
            return 0
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.drain: {exc}", file=sys.stderr)
        return 1
    finally:
        if profiler:
            profiler.stop()
        procs.stop_all()
        if db:
            db.close()
        if client is not None:
            client.close()
        for service in reversed(services):
            service.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
