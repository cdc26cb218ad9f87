"""Ingest vs bare: the webhook endpoint against a Flask app that does nothing, same server and load.

    python -m bench.ingest [--duration 15] [--server granian|gunicorn] [--rounds 1]

Starts a LocalRedis (AOF, appendfsync always, no automatic AOF rewrite unless --aof-rewrite
auto) in a temporary folder, then serves (a) Leadpipe's
`ingest:create_app` and (b) `bench.bare:create_app` with the command line `leadpipe api` uses
(config.cli.api_command: same server, workers and threads), and drives each with wrk POSTing
../shared/fixtures/rdstation/mkt-v2-converted.json with the ingest token. It prints req/s, p50
and p99 of both and the ratio ours/bare, then checks that every event id the endpoint answered
202 for is on the Redis stream (nothing acknowledged was lost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import (
    FIXTURES,
    BenchError,
    Processes,
    Usage,
    group_usage,
    machine,
    print_versions,
    tail,
    terminate_as_interrupt,
    wait_until,
)
from config.cli import SERVERS, THREADS, api_command
from config.local import LocalRedis, free_port
from config.settings import PREFIX, Settings

TOKEN = "bench-ingest-token-0123456789"
PATH = f"/webhooks/rdstation?token={TOKEN}"
BODY = FIXTURES / "mkt-v2-converted.json"
LUA = Path(__file__).with_name("post.lua")
APPS = {"ours": "ingest:create_app", "bare": "bench.bare:create_app"}
TARGET_RATIO = 0.75  # issue 2
LATER_RATIO, LATER_P99_MS = 0.80, 25.0


@dataclass
class WrkResult:
    """One wrk run, from the BENCH line post.lua prints and wrk's own summary."""

    requests: int
    duration_s: float
    ok: int
    other: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    output: str
    server: Usage = Usage()  # of the server's processes during the run
    redis: Usage = Usage()  # of redis-server during the run
    wrk_cpu_s: float = 0.0  # of the load generator (user + system)
    aof_rewrites: int = 0  # AOF rewrites Redis started during the run

    def per_request(self, seconds: float) -> float:
        """Microseconds per request."""
        return seconds * 1e6 / max(1, self.requests)

    @property
    def server_cpu_us(self) -> float:
        return self.per_request(self.server.user + self.server.system)

    @property
    def redis_cpu_us(self) -> float:
        return self.per_request(self.redis.user + self.redis.system)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def line(self) -> str:
        errors = sum(self.socket_errors.values())
        return (f"req/s {self.rps:9.1f}   p50 {self.p50_ms:6.2f} ms   p99 {self.p99_ms:6.2f} ms"
                f"   ({self.requests} requests, {self.ok} 2xx, {self.non_2xx_3xx} non-2xx, "
                f"{errors} socket errors; AOF rewrites {self.aof_rewrites})\n"
                f"        CPU per request: server {self.server_cpu_us:.0f} us (user "
                f"{self.per_request(self.server.user):.0f}, system "
                f"{self.per_request(self.server.system):.0f}; "
                f"{self.server.switches / max(1, self.requests):.2f} voluntary context switches), "
                f"redis {self.redis_cpu_us:.0f} us (user {self.per_request(self.redis.user):.0f}, "
                f"system {self.per_request(self.redis.system):.0f}), "
                f"wrk {self.per_request(self.wrk_cpu_s):.0f} us")


def parse_wrk(output: str) -> WrkResult:
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise BenchError(f"wrk printed no BENCH line:\n{output}")
    v = {k: float(x) for k, x in (part.split("=", 1) for part in line.split()[1:])}
    return WrkResult(
        requests=int(v["requests"]), duration_s=v["duration_us"] / 1e6, ok=int(v["ok"]),
        other=int(v["other"]), non_2xx_3xx=int(v["non2xx3xx"]),
        socket_errors={k: int(v[k]) for k in ("connect", "read", "write", "timeout")},
        mean_ms=v["mean_us"] / 1000, p50_ms=v["p50_us"] / 1000, p90_ms=v["p90_us"] / 1000,
        p99_ms=v["p99_us"] / 1000, max_ms=v["max_us"] / 1000, output=output)


def run_wrk(port: int, duration: int, args: argparse.Namespace,
            ids_file: Path | None = None) -> WrkResult:
    env = {**os.environ, "BENCH_BODY_FILE": str(BODY), "BENCH_PATH": PATH,
           "BENCH_IDS_FILE": str(ids_file) if ids_file else ""}
    cmd = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections),
           "-d", f"{duration}s", "--timeout", "5s", "--latency", "-s", str(LUA),
           f"http://127.0.0.1:{port}{PATH}"]
    before = os.times()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with code {proc.returncode}:\n{output}")
    after = os.times()  # wrk was waited for: its CPU is in the children's times
    result = parse_wrk(output)
    result.wrk_cpu_s = (after.children_user - before.children_user
                        + after.children_system - before.children_system)
    return result


def start_server(procs: Processes, name: str, settings: Settings, env: dict[str, str],
                 args: argparse.Namespace, logs: Path) -> tuple[subprocess.Popen, int, list[str]]:
    port = free_port()
    cmd = api_command(settings, "127.0.0.1", port, args.workers, args.server,
                      args.server_threads, app_spec=APPS[name])
    log = logs / f"server-{name}.log"
    proc = procs.start(f"server-{name}", cmd, log, env=env)

    def up() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{name} server exited with code {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until(up, 60, f"the {name} server on port {port}")
    return proc, port, cmd


@dataclass
class StreamCheck:
    answered: int
    on_stream: int
    missing: int
    repeated_ids: int
    body_matches: bool
    connections: int

    @property
    def ok(self) -> bool:
        extra = self.on_stream - self.answered
        return (self.missing == 0 and self.repeated_ids == 0 and self.body_matches
                and 0 <= extra <= self.connections)

    def line(self) -> str:
        extra = self.on_stream - self.answered
        return (f"stream check: {self.answered} answered 2xx (wrk), {self.on_stream} entries on "
                f"the Redis stream, {self.missing} answered ids missing from the stream, "
                f"{extra} accepted whose reply wrk cut off at its deadline (at most "
                f"{self.connections}) -> {'OK' if self.ok else 'FAILED'}")


def check_stream(client, key: str, ids_file: Path, result: WrkResult,  # type: ignore[no-untyped-def]
                 connections: int) -> StreamCheck:
    """Every id answered 202 must be on the stream; extra entries can only be wrk's cut-off tail."""
    answered = [x for x in ids_file.read_text().split("\n") if x]
    if len(answered) != result.ok:
        raise BenchError(f"post.lua kept {len(answered)} ids for {result.ok} 2xx answers")
    time.sleep(0.5)  # requests wrk abandoned at its deadline finish on the server
    on_stream: set[str] = set()
    body_matches = True
    fixture = BODY.read_bytes()
    start = "-"
    while True:
        rows = client.xrange(key, min=start, count=10_000)
        for _, fields in rows:
            on_stream.add(fields[b"i"].decode())
            body_matches = body_matches and fields[b"b"] == fixture
        if len(rows) < 10_000:
            break
        start = "(" + rows[-1][0].decode()
    return StreamCheck(answered=len(answered), on_stream=int(client.xlen(key)),
                       missing=len(set(answered) - on_stream),
                       repeated_ids=len(answered) - len(set(answered)),
                       body_matches=body_matches, connections=connections)


def server_description(args: argparse.Namespace) -> str:
    if args.server == "granian":
        return (f"granian (wsgi), {args.workers} workers x {args.server_threads} "
                "blocking threads")
    return f"gunicorn (gthread), {args.workers} workers x {args.server_threads} threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=15, help="seconds of load per run (15)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure ours and bare this many times, alternating order (1)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--server", choices=SERVERS, default="granian",
                   help="the production server (default: as `leadpipe api`, granian)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="server worker processes (default: as `leadpipe api`, the CPU count)")
    p.add_argument("--server-threads", type=int, default=THREADS,
                   help=f"threads per worker (default: as `leadpipe api`, {THREADS})")
    p.add_argument("--redis-fsync", choices=("always", "everysec"), default="always",
                   help="Redis appendfsync for this run (default always, as `leadpipe run`; "
                        "everysec only to measure the trade-off)")
    p.add_argument("--aof-rewrite", choices=("off", "auto"), default="off",
                   help="Redis auto-aof-rewrite for this run (default off: the benchmark's "
                        "stream is never consumed, so a rewrite would copy a backlog of ~100 MB "
                        "that a running pipeline does not keep; auto: Redis' own default)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of both servers, e.g. LEADPIPE_GROUP_COMMIT=false")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, AOF)")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")

    tmp = Path(tempfile.mkdtemp(prefix="leadpipe-bench-ingest-"))
    procs = Processes()
    redis_server: LocalRedis | None = None
    try:
        with terminate_as_interrupt():
            machine_text = machine()  # before our own servers boot and keep the CPUs busy
            # assigned first: stopped even if start fails
            redis_server = LocalRedis(tmp / "redis", port=free_port())
            redis_server.start()
            from ingest.queue import make_redis

            admin = make_redis(redis_server.url, timeout=5)
            admin.config_set("appendfsync", args.redis_fsync)
            if args.aof_rewrite == "off":
                admin.config_set("auto-aof-rewrite-percentage", "0")
            admin.close()
            if any("=" not in item for item in args.env):
                raise BenchError("--env takes NAME=VALUE")
            extra = dict(item.split("=", 1) for item in args.env)
            settings = Settings.from_env(extra, redis_url=redis_server.url,
                                         ingest_tokens=(TOKEN,), namespace="bench")
            env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
            env.update(extra)
            env.update(settings.to_env())
            servers = {name: start_server(procs, name, settings, env, args, tmp)
                       for name in APPS}
            print("bench.ingest: ingest endpoint vs bare Flask app")
            print("configuration")
            print(f"  server       {server_description(args)} (config.cli.api_command)")
            for name, (_, _, cmd) in servers.items():
                print(f"  {name + ' cmd':<12} {' '.join(cmd[1:])}")
            print(f"  load         wrk: {args.wrk_threads} threads, {args.connections} "
                  f"connections, {args.duration:g} s per run after {args.warmup:g} s warm-up, "
                  f"{args.rounds} round(s)")
            print(f"  request      POST {PATH.split('?')[0]}?token=... Content-Type "
                  f"application/json, body {BODY.name} ({BODY.stat().st_size} bytes)")
            print(f"  redis        LocalRedis {redis_server.url} (AOF, appendfsync "
                  f"{args.redis_fsync}, auto AOF rewrite {args.aof_rewrite}), "
                  f"stream {settings.stream_key}")
            given = "".join(" " + e for e in args.env)
            print(f"  ours         LEADPIPE_* defaults except REDIS_URL/INGEST_TOKENS/NAMESPACE"
                  f"{given}: ingest_fast_path {settings.ingest_fast_path}, group_commit "
                  f"{settings.group_commit}, redis_timeout_seconds "
                  f"{settings.redis_timeout_seconds}, log_level {settings.log_level}")
            print_versions(["python", "redis-server", "postgres", "celery", "redis-py",
                            "flask", "gunicorn", "granian", "wrk"], machine_text)
            sys.stdout.flush()
            results = run_rounds(args, settings, servers, redis_server, tmp)
            return report(args, results)
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.ingest: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if redis_server:
            redis_server.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_rounds(args: argparse.Namespace, settings: Settings,
               servers: dict[str, tuple[subprocess.Popen, int, list[str]]],
               redis_server: LocalRedis, tmp: Path) -> dict[str, list[tuple[WrkResult, object]]]:
    from ingest.queue import make_redis

    client = make_redis(redis_server.url, timeout=30)
    results: dict[str, list[tuple[WrkResult, object]]] = {name: [] for name in APPS}
    try:
        for n in range(args.rounds):
            order = list(APPS) if n % 2 == 0 else list(reversed(APPS))
            print(f"round {n + 1}")
            for name in order:
                port = servers[name][1]
                if args.warmup > 0:
                    run_wrk(port, args.warmup, args)
                    time.sleep(0.5)
                client.delete(settings.stream_key)  # the stream holds this run's entries only
                # wrk keeps the answered ids of both, so the load generator does the same work
                # on the same cores whichever app it drives; only ours' are checked
                ids_file = tmp / f"ids-{name}-{n}.txt"
                server_pgid = servers[name][0].pid
                redis_pgid = redis_server.proc.pid if redis_server.proc else 0
                usage = group_usage(server_pgid), group_usage(redis_pgid)
                rewrites = client.info("persistence")["aof_rewrites"]
                result = run_wrk(port, args.duration, args, ids_file)
                after = client.info("persistence")
                result.aof_rewrites = (after["aof_rewrites"] - rewrites
                                       + after["aof_rewrite_in_progress"])
                result.server = group_usage(server_pgid) - usage[0]
                result.redis = group_usage(redis_pgid) - usage[1]
                check = None
                if name == "ours":
                    check = check_stream(client, settings.stream_key, ids_file, result,
                                         args.connections)
                results[name].append((result, check))
                print(f"  {name:<5} {result.line()}", flush=True)
                if check is not None:
                    print(f"        {check.line()}", flush=True)
            ours, bare = results["ours"][-1][0], results["bare"][-1][0]
            print(f"  round ratio ours/bare: {ours.rps / bare.rps:.3f}", flush=True)
    finally:
        client.close()
    return results


def report(args: argparse.Namespace, results: dict[str, list[tuple[WrkResult, object]]]) -> int:
    med = {name: (statistics.median(r.rps for r, _ in runs),
                  statistics.median(r.p50_ms for r, _ in runs),
                  statistics.median(r.p99_ms for r, _ in runs)) for name, runs in results.items()}
    label = "median of rounds" if args.rounds > 1 else "single round"
    print(f"result ({label}; {server_description(args)}; wrk {args.connections} connections, "
          f"{args.duration:g} s)")
    for name in APPS:
        rps, p50, p99 = med[name]
        print(f"  {name:<5} req/s {rps:9.1f}   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    # each round's ratio pairs the two sides measured under the same conditions; medians of
    # each side apart could pair different rounds
    ratios = [o.rps / b.rps for (o, _), (b, _) in zip(results["ours"], results["bare"],
                                                       strict=True)]
    ratio = statistics.median(ratios)
    p99 = med["ours"][2]
    spread = f", rounds {min(ratios):.3f}–{max(ratios):.3f}" if len(ratios) > 1 else ""
    print(f"ratio ours/bare: {ratio:.3f} (req/s; median of the rounds' ratios{spread})")
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"target (issue 2) ratio >= {TARGET_RATIO}: {met};"
          f" later ratio >= {LATER_RATIO} and p99 <= {LATER_P99_MS:g} ms: "
          f"{'met' if ratio >= LATER_RATIO and p99 <= LATER_P99_MS else 'NOT met'}")
    failures = []
    for name, runs in results.items():
        for result, check in runs:
            if name == "ours" and (result.non_2xx_3xx or result.other):
                failures.append(f"ours answered {result.non_2xx_3xx} non-2xx")
            errors = sum(result.socket_errors.values())
            if errors:  # wrk leaves timed-out requests out of the p99; either side's errors
                # lower its req/s, and the bare side's would flatter the ratio
                kinds = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v)
                failures.append(f"{name} had {errors} socket errors ({kinds})")
            if name == "bare" and (result.non_2xx_3xx or result.other):
                failures.append(f"bare answered {result.non_2xx_3xx} non-2xx: the ratio "
                                "compares nothing")
            if isinstance(check, StreamCheck) and not check.ok:
                failures.append(check.line())
    if failures:
        print("verification: FAILED: " + "; ".join(failures))
        return 1
    print("verification: OK (both answered only 2xx, no socket errors; every id ours answered "
          "is on the stream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
