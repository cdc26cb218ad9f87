"""The `leadpipe` command: run, api, worker, flower, migrate, quarantine, config, ..."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.inputs import Invalid, finite_number, instant, whole_number
from config.settings import ConfigError, Settings, documented

SERVERS = ("gunicorn", "granian")
STILL_QUARANTINED = 3  # exit code of `quarantine replay` when the current code still refuses it
# Request threads per API process: they mostly wait for Redis' fsync, and the more wait at
# once, the more requests share one write (docs/PERFORMANCE.md: 16 against 4).
THREADS = 16
# A Marketing v2 conversion as RD Station sends it, small enough for a copy-paste curl.
SAMPLE = ('{"event_type":"WEBHOOK.CONVERTED","entity_type":"CONTACT",'
          '"event_identifier":"quickstart","timestamp":"2026-01-01T12:00:01Z",'
          '"event_timestamp":"2026-01-01T12:00:00Z","contact":{"uuid":"quickstart-0001",'
          '"email":"ana@example.com","name":"Ana","funnel":{"opportunity":false}}}')


def _settings() -> Settings:
    return Settings.from_env()


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.db import current_revision

    settings = _settings()
    if not settings.database_url:
        raise ConfigError("LEADPIPE_DATABASE_URL is not set")
    apply_migrations(settings.database_url)
    print(f"database at revision {current_revision(settings.database_url)[0]}")
    return 0


def apply_migrations(dsn: str) -> None:
    """`leadpipe migrate`'s work (and `leadpipe run`'s); alembic's refusal, e.g. of a database
    a newer Leadpipe migrated, is one line (ConfigError), not a traceback."""
    from alembic.util.exc import CommandError

    from sinks.db import migrate

    try:
        migrate(dsn)
    except CommandError as exc:
        raise ConfigError(f"migrations: {str(exc).strip().splitlines()[0]}") from None


def check_routing(settings: Settings) -> None:
    """Load the routing file as the workers will (it only reads the file): a bad one stops
    start-up, whatever the command serves, instead of failing every task."""
    from workers.routing import load

    load(settings.routes_file)


def worker_queues(settings: Settings) -> list[str]:
    """The ingest queue, the default queue, the subscriptions' queue, and the queue of every sink
    that is not paused."""
    from workers.runtime import Runtime, sink_queue, subscriptions_queue

    runtime = Runtime(settings)
    paused = runtime.control.paused()
    return [settings.ingest_queue, settings.default_queue, subscriptions_queue(settings),
            *(sink_queue(settings, name) for name in runtime.routing.sinks if name not in paused)]


def cmd_worker(args: argparse.Namespace) -> int:
    from config.logs import setup
    from workers.app import make_celery

    settings = _settings()
    check_routing(settings)  # also with --queues, which does not read the sinks' names
    setup(settings.log_level, settings.log_pii)
    app = make_celery(settings)
    app.leadpipe.all_queues = not args.queues  # type: ignore[attr-defined]
    queues = args.queues or ",".join(worker_queues(settings))
    # --quiet: no banner on stdout, so every line the worker writes is JSON
    argv = ["--quiet", "worker", "-Q", queues, "-c",
            str(args.concurrency or settings.worker_concurrency),
            "-n", f"leadpipe-{os.getpid()}@%h", "--loglevel", settings.log_level,
            "--without-mingle", "--without-gossip"]
    app.worker_main(argv)
    return 0


def flower_argv(settings: Settings, host: str, port: int | None, no_auth: bool) -> list[str]:
    """`celery flower` arguments for our app; the credentials stay inside this process (no
    command line or environment of a child shows them)."""
    if not settings.flower_basic_auth and not no_auth:
        raise ConfigError("LEADPIPE_FLOWER_BASIC_AUTH is not set (user:password): Flower would "
                          "show every worker and task, and control them, to anyone who can "
                          "reach it; pass --no-auth to run it open on purpose")
    argv = ["flower", f"--address={host}", f"--port={port or settings.flower_port}"]
    if settings.flower_basic_auth:
        argv.append("--basic_auth=" + ",".join(settings.flower_basic_auth))
    return argv


def cmd_flower(args: argparse.Namespace) -> int:
    from config.logs import setup
    from workers.app import make_celery

    settings = _settings()
    argv = flower_argv(settings, args.host, args.port, args.no_auth)
    setup(settings.log_level, settings.log_pii)
    return int(make_celery(settings).start(argv) or 0)


def api_command(settings: Settings, host: str, port: int, workers: int, server: str,
                threads: int = THREADS, app_spec: str = "ingest.wsgi:create_app") -> list[str]:
    """The production server command line for the ingest app.

    `app_spec` names the app factory as "module:function"; another app (the benchmark's bare
    Flask app) can be served by exactly the same command.
    """
    log_config = str(server_log_config(settings))
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
                "--host", host, "--port", str(port), "--workers", str(workers),
                "--blocking-threads", str(threads), "--no-ws", "--log-level", "warning",
                "--log-config", log_config, app_spec]
    return [sys.executable, "-m", "gunicorn", "-b", host_port(host, port), "-w", str(workers),
            "-k", "gthread", "--threads", str(threads), "--log-level", "warning",
            "--log-config-json", log_config, f"{app_spec}()"]


def host_port(host: str, port: int) -> str:
    """host:port as a URL or a bind address writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_log_config(settings: Settings) -> Path:
    """A logging dictConfig file that makes the server's own lines (granian's, gunicorn's) the
    same JSON lines as Leadpipe's, so a log pipeline reads one format."""
    import hashlib
    import json
    import tempfile

    handler = {"class": "logging.StreamHandler", "formatter": "json",
               "stream": "ext://sys.stderr"}
    config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "config.logs.JsonFormatter",
                                "log_pii": settings.log_pii}},
        "handlers": {"console": handler, "access": dict(handler)},
        "loggers": {name: {"handlers": ["access" if "access" in name else "console"],
                           "level": "WARNING", "propagate": False}
                    for name in ("_granian", "granian.access", "gunicorn.error",
                                 "gunicorn.access")},
    }
    text = json.dumps(config, sort_keys=True)
    # named by its content: two servers started with different settings (log_pii) at once
    # never read each other's; the same settings share one file
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = private_dir() / f"server-logging-{digest}.json"
    fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # mode 0600
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temporary, path)  # whole: a server starting meanwhile never reads half a file
    return path


def private_dir() -> Path:
    """A folder under the temp dir that only this user can enter: /tmp/leadpipe-<uid>, made
    0700, or a fresh one when that name is taken by anything else (another user's, a symlink,
    open to others): a file the server loads as its logging config (which can name classes
    to import) must not be one another local user could place or change."""
    import stat
    import tempfile

    path = Path(tempfile.gettempdir()) / f"leadpipe-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    if (info is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & 0o077):
        return Path(tempfile.mkdtemp(prefix="leadpipe-"))
    return path


def cmd_api(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.ingest_tokens:
        raise ConfigError("LEADPIPE_INGEST_TOKENS is not set: the endpoint would accept no one")
    check_routing(settings)  # the API's /ops and operator API read it
    _warn_if_not_durable(settings)
    cmd = api_command(settings, args.host, args.port, args.workers, args.server, args.threads)
    os.execv(sys.executable, cmd)  # noqa: S606 (replace this process by the server)
    return 0  # not reached


def _warn_if_not_durable(settings: Settings) -> None:
    """Say so on stderr when the Redis the endpoint writes to would not keep what it
    acknowledges; an unreachable one is left to the endpoint (503 until it answers)."""
    import redis

    from ingest.durability import redis_durability
    from ingest.queue import make_redis

    try:
        durable, text = redis_durability(make_redis(settings.redis_url, timeout=2, retries=0))
    except redis.RedisError:
        return
    if durable is not True:
        print(f"leadpipe api: warning: Redis {text}", file=sys.stderr)


def cmd_quarantine(args: argparse.Namespace) -> int:
    from workers import quarantine

    settings = _settings()
    if not settings.database_url:
        raise ConfigError("LEADPIPE_DATABASE_URL is not set")
    if args.action == "list":
        rows = quarantine.list_rows(settings.database_url, args.limit)
        if not rows:
            print("quarantine is empty")
        for row in rows:
            print(f"{row['id']}  {row['quarantined_at']:%Y-%m-%d %H:%M:%S}  "
                  f"replays={row['replays']}  {row['reason']}")
        return 0
    if not args.id:
        raise ConfigError("quarantine replay needs an ID (see `leadpipe quarantine list`)")
    result = quarantine.replay(_ops_runtime(), args.id)  # with the app: deliveries go at once
    if result.still_rejected:
        print(f"{result.id}: still quarantined: {result.still_rejected}")
        return STILL_QUARANTINED
    print(f"{result.id}: replayed: {result.stored} event(s) stored, "
          f"{result.duplicates} duplicate(s)")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    from workers.routing import load

    if args.action == "check":
        routing = load(args.file)
        print(f"{args.file}: OK: {len(routing.sinks)} sink(s), {len(routing.routes)} route(s)")
        for spec in routing.sinks.values():
            rate = f", rate {spec.rate[0]}/{spec.rate[1]:g}s" if spec.rate else ""
            print(f"  sink {spec.name} ({spec.type}): retries {list(spec.retry_schedule)}{rate}, "
                  f"circuit {spec.circuit_failures} failures / {spec.circuit_cooldown:g}s")
        for route in routing.routes:
            print(f"  route {route.name!r} -> {', '.join(route.to)}")
        return 0
    if args.event_type is not None:
        from ingest.views import KNOWN_HINTS

        if args.event_type not in KNOWN_HINTS:  # the endpoint answers such a hint with 400
            raise ConfigError(f"--event-type must be {' or '.join(sorted(KNOWN_HINTS))}")
    return _explain(args.file, args.routes or _settings().routes_file, args.event_type)


def _explain(fixture: str, routes_file: str | None, hint: str | None) -> int:
    from ingest.queue import Entry
    from workers.events import Rejected
    from workers.normalize import normalize
    from workers.routing import load

    routing = load(routes_file)
    body = Path(fixture).read_bytes()
    print(f"routing: {routing.source}")
    for item in normalize(Entry("explain", "explain", int(time.time() * 1000), body, hint)):
        if isinstance(item, Rejected):
            print(f"quarantined: {item.reason}")
        else:
            print("\n".join(routing.explain(item)))
    return 0


def _ops_runtime():  # type: ignore[no-untyped-def]
    from workers.app import make_celery

    settings = _settings()
    if not settings.database_url:
        raise ConfigError("LEADPIPE_DATABASE_URL is not set")
    return make_celery(settings).leadpipe.runtime()


def cmd_sinks(args: argparse.Namespace) -> int:
    from workers import operations

    runtime = _ops_runtime()
    if args.action == "list":
        states = operations.sink_states(runtime)
        if not states:
            print("no sinks: events go to Postgres only (LEADPIPE_ROUTES_FILE is "
                  + ("unset)" if not runtime.settings.routes_file else "empty)"))
        for row in states:
            print(f"{row['sink']:<20} {row['type']:<10} "
                  f"{'PAUSED' if row['paused'] else 'running':<8} circuit={row['circuit']:<9} "
                  f"pending={row['pending']} delivered={row['delivered']} dead={row['dead']} "
                  f"superseded={row['superseded']}")
        return 0
    if not args.name:
        raise ConfigError(f"sinks {args.action} needs a sink NAME (see `leadpipe sinks list`)")
    getattr(operations, args.action)(runtime, args.name)
    print(f"{args.name}: {'paused' if args.action == 'pause' else 'resumed'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The pipeline at a glance; exit status 1 when Redis or Postgres could not be read."""
    import json

    from workers import status

    runtime = _ops_runtime()
    state = status.collect(runtime, delivered=True)
    # with the broker unreachable no worker can answer: do not spend kombu's retries asking
    workers = status.workers(runtime.app, args.timeout) if state.redis_up else {}
    if args.json:
        print(json.dumps({**state.as_dict(), "workers": workers}, indent=2, default=str))
    else:
        print(status.render(state, workers, args.timeout))
    return 0 if state.redis_up and state.postgres_up else 1


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from workers import operations

    runtime = _ops_runtime()
    if args.action == "list":
        rows = operations.dead_letters(runtime.settings.database_url, args.sink, args.limit,
                                       since=args.since)
        if not rows and args.sink:  # none, or a name that is wrong: say which
            operations.known_target(runtime, args.sink)
        if not rows:
            print("no dead letters")
        for r in rows:
            print(f"{r['id']:>6}  {r['dead_at']:%Y-%m-%d %H:%M:%S}  {r['sink']:<16} "
                  f"event={r['event_id']} attempts={r['attempts']} "
                  f"status={r['status_code'] or '-'}  {r['error']}")
        return 0
    if not (args.ids or args.sink):
        raise ConfigError("dead-letters replay needs IDs or --sink NAME")

    def progress(done: int, total: int) -> None:
        print(f"\rreplayed {done}/{total}", end="", file=sys.stderr, flush=True)

    ids = [whole_number(i, "A dead-letter id (see `leadpipe dead-letters list`)")
           for i in args.ids]
    count = operations.replay(runtime, ids or None, args.sink, args.since, progress)
    print(f"\nreplayed {count} dead letter(s)")
    missed = len(set(ids)) - count
    if ids and missed:  # as the operator API's 404: say so, and fail the script that asked
        print(f"leadpipe: {missed} of the dead letters named were not waiting for replay "
              "(no such id, already replayed, or not matching --sink/--since)", file=sys.stderr)
        return 2
    return 0


def _argument(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from an operator-input check, keeping the check's own message."""
    def convert(raw: str) -> Any:
        try:
            return check(raw)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _seconds(raw: str) -> float:
    value = finite_number(raw, "--timeout")
    if not 0 < value <= 60:
        raise Invalid("--timeout must be seconds above 0, at most 60.")
    return value


_limit = _argument(lambda raw: whole_number(raw, "--limit", 1, 100_000))
_timeout = _argument(_seconds)
_since = _argument(lambda raw: instant(raw, "--since"))
_port = _argument(lambda raw: whole_number(raw, "--port", 1, 65_535))


def _count(name: str) -> Callable[[str], int]:
    return _argument(lambda raw: whole_number(raw, name, 1, 1024))


class _Parser(argparse.ArgumentParser):
    """Refuses bad arguments in one line on stderr (exit 2), as every other refusal."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def cmd_purge(args: argparse.Namespace) -> int:
    from workers import retention

    runtime = _ops_runtime()
    kept = retention.retention(runtime.settings)
    if not kept:
        print("no retention is set (LEADPIPE_RETAIN_*_DAYS): nothing to purge")
        return 0

    def progress(store: str, done: int) -> None:
        print(f"\r{store}: {done} row(s)", end="", file=sys.stderr, flush=True)

    with runtime.pool.connection() as conn:
        done = retention.purge(conn, runtime.settings, progress)
    print(file=sys.stderr)
    for store, n in done.items():
        print(f"{store}: purged {n} row(s) older than {kept[store]} day(s)")
    print(f"redis append-only file: {retention.rewrite_append_only_file(runtime.redis)}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from workers import retention

    runtime = _ops_runtime()
    with runtime.pool.connection() as conn:
        touched = retention.erase(conn, runtime.stream, args.email)
    for store, n in touched.items():
        print(f"{store}: {n}")
    print(f"erased: {sum(touched.values())} row(s) or entries in {len(touched)} stores")
    rewrite = retention.rewrite_append_only_file(runtime.redis, wait=retention.AOF_WAIT_SECONDS)
    print(f"redis append-only file: {rewrite}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for name, default, doc in documented():
            shown = default if default.startswith("(") else f"`{default}`" if default else "—"
            print(f"| `{name}` | {shown} | {doc} |")
        return 0
    width = max(len(name) for name, _, _ in documented())
    for name, default, doc in documented():
        print(f"{name:<{width}}  {default or '-':<12}  {doc}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from config.run import run

    return run(args)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leadpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add_server_options(sp: argparse.ArgumentParser, port: int) -> None:
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=_port, default=port)
        sp.add_argument("--workers", type=_count("--workers"), default=os.cpu_count() or 1)
        sp.add_argument("--threads", type=_count("--threads"), default=THREADS)
        sp.add_argument("--server", choices=SERVERS, default="granian",
                        help="granian (default: measured fastest here, see docs/PERFORMANCE.md) "
                             "or gunicorn (gthread)")

    run = sub.add_parser("run", help="all-in-one: local Redis/Postgres if unset, API and worker")
    add_server_options(run, 8000)
    run.set_defaults(func=cmd_run)
    api = sub.add_parser("api", help="the ingest API under a production server")
    add_server_options(api, 8000)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="a Celery worker node (with its ingest pump)")
    worker.add_argument("--concurrency", type=_count("--concurrency"))
    worker.add_argument("--queues", help="comma-separated Celery queues (default: all of ours)")
    worker.set_defaults(func=cmd_worker)
    flower = sub.add_parser("flower", help="Flower (Celery's monitor) on our broker, basic auth")
    flower.add_argument("--host", default="127.0.0.1")
    flower.add_argument("--port", type=_port, help="default LEADPIPE_FLOWER_PORT")
    flower.add_argument("--no-auth", action="store_true",
                        help="run without LEADPIPE_FLOWER_BASIC_AUTH (open to anyone)")
    flower.set_defaults(func=cmd_flower)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    q = sub.add_parser("quarantine", help="bodies that could not be understood")
    q.add_argument("action", choices=("list", "replay"))
    q.add_argument("id", nargs="?")
    q.add_argument("--limit", type=_limit, default=50)
    q.set_defaults(func=cmd_quarantine)
    cfg = sub.add_parser("config", help="list every LEADPIPE_* setting")
    cfg.add_argument("--markdown", action="store_true", help="as the README's table")
    cfg.set_defaults(func=cmd_config)
    routes = sub.add_parser("routes", help="check a routing file; explain where an event goes")
    routes.add_argument("action", choices=("check", "explain"))
    routes.add_argument("file", help="check: the routing file; explain: an event body (JSON)")
    routes.add_argument("--routes", help="explain: the routing file (default LEADPIPE_ROUTES_FILE)")
    routes.add_argument("--event-type", help="explain: the ?event_type= of a legacy body")
    routes.set_defaults(func=cmd_routes)
    sinks = sub.add_parser("sinks", help="list sinks; pause or resume one")
    sinks.add_argument("action", choices=("list", "pause", "resume"))
    sinks.add_argument("name", nargs="?")
    sinks.set_defaults(func=cmd_sinks)
    st = sub.add_parser("status", help="ingest stream, sinks, quarantine and workers at a glance")
    st.add_argument("--timeout", type=_timeout, default=1.0,
                    help="seconds to wait for workers to answer (Celery inspect)")
    st.add_argument("--json", action="store_true", help="as JSON")
    st.set_defaults(func=cmd_status)
    dl = sub.add_parser("dead-letters", help="deliveries that failed for good; replay them")
    dl.add_argument("action", choices=("list", "replay"))
    dl.add_argument("ids", nargs="*", help="replay: dead-letter ids")
    dl.add_argument("--sink")
    dl.add_argument("--since", type=_since,
                    help="only those dead since this ISO-8601 time (no offset: UTC)")
    dl.add_argument("--limit", type=_limit, default=100)
    dl.set_defaults(func=cmd_dead_letters)
    sub.add_parser("purge", help="apply the retention settings (LEADPIPE_RETAIN_*_DAYS) now"
                   ).set_defaults(func=cmd_purge)
    erase = sub.add_parser("erase", help="remove one person from every store Leadpipe keeps")
    erase.add_argument("--email", required=True)
    erase.set_defaults(func=cmd_erase)
    from ingest import tokens  # here, not at the top: it loads Flask and Redis

    tokens.add_cli(sub)
    return p


def _unavailable(exc: BaseException) -> str | None:
    """What a store's failure says to an operator (no traceback), or None if it is not one."""
    import kombu.exceptions
    import psycopg
    import redis
    from psycopg_pool import PoolTimeout

    if isinstance(exc, redis.RedisError | kombu.exceptions.OperationalError):
        return f"Redis unavailable ({type(exc).__name__}: {exc}); check LEADPIPE_REDIS_URL"
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return ("the database at LEADPIPE_DATABASE_URL is not migrated to this version of "
                "Leadpipe: run `leadpipe migrate`")
    if isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError) and getattr(
            exc, "sqlstate", None) is None:  # libpq refused the URL before any server answered
        return (f"Postgres cannot be reached with LEADPIPE_DATABASE_URL ({type(exc).__name__}; "
                "the message is not shown: it may hold the password)")
    from workers.retention import ErasureBusy, ErasureUnfinished

    if isinstance(exc, ErasureBusy | ErasureUnfinished):
        return str(exc)
    if isinstance(exc, PoolTimeout | psycopg.OperationalError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (f"Postgres unavailable ({type(exc).__name__}: {first}); check "
                "LEADPIPE_DATABASE_URL")
    if type(exc).__module__.startswith("sqlalchemy") and isinstance(exc.__cause__,
                                                                     psycopg.Error):
        return _unavailable(exc.__cause__)  # `migrate` goes through SQLAlchemy
    return None


LONG_RUNNING = frozenset({"run", "api", "worker", "flower"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command not in LONG_RUNNING:
        import logging

        # the pool logs each failed connection attempt; the command says it once, at the end
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, LookupError, ValueError, OSError) as exc:
        print(f"leadpipe: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = _unavailable(exc)
        if message is None:
            raise
        print(f"leadpipe: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
