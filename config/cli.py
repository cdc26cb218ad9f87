"""The `leadpipe` command: run, api, worker, migrate, quarantine, config."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from config.settings import ConfigError, Settings, documented

SERVERS = ("gunicorn", "granian")


def _settings() -> Settings:
    return Settings.from_env()


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.db import current_revision, migrate

    settings = _settings()
    if not settings.database_url:
        raise ConfigError("LEADPIPE_DATABASE_URL is not set")
    migrate(settings.database_url)
    print(f"database at revision {current_revision(settings.database_url)[0]}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from config.logs import setup
    from workers.app import make_celery

    settings = _settings()
    setup(settings.log_level)
    app = make_celery(settings)
    queues = args.queues or f"{settings.ingest_queue},{settings.namespace}.default"
    argv = ["worker", "-Q", queues, "-c", str(args.concurrency or settings.worker_concurrency),
            "-n", f"leadpipe-{os.getpid()}@%h", "--loglevel", settings.log_level,
            "--without-mingle", "--without-gossip"]
    app.worker_main(argv)
    return 0


def api_command(settings: Settings, host: str, port: int, workers: int, server: str,
                threads: int = 4, app_spec: str = "ingest:create_app") -> list[str]:
    """The production server command line for the ingest app.

    `app_spec` names the app factory as "module:function"; another app (the benchmark's bare
    Flask app) can be served by exactly the same command.
    """
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
                "--host", host, "--port", str(port), "--workers", str(workers),
                "--blocking-threads", str(threads), "--no-ws", "--log-level", "warning",
                app_spec]
    return [sys.executable, "-m", "gunicorn", "-b", f"{host}:{port}", "-w", str(workers),
            "-k", "gthread", "--threads", str(threads), "--log-level", "warning",
            f"{app_spec}()"]


def cmd_api(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.ingest_tokens:
        raise ConfigError("LEADPIPE_INGEST_TOKENS is not set: the endpoint would accept no one")
    cmd = api_command(settings, args.host, args.port, args.workers, args.server, args.threads)
    os.execv(sys.executable, cmd)  # noqa: S606 (replace this process by the server)
    return 0  # not reached


def cmd_quarantine(args: argparse.Namespace) -> int:
    from workers import quarantine
    from workers.runtime import Runtime

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
    result = quarantine.replay(Runtime(settings), args.id)
    if result.still_rejected:
        print(f"{result.id}: still quarantined: {result.still_rejected}")
        return 1
    print(f"{result.id}: replayed: {result.stored} event(s) stored, "
          f"{result.duplicates} duplicate(s)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    width = max(len(name) for name, _, _ in documented())
    for name, default, doc in documented():
        print(f"{name:<{width}}  {default or '-':<12}  {doc}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Everything on one machine: local Redis/Postgres when unset, migrations, worker and API."""
    from config.local import LocalPostgres, LocalRedis
    from sinks.db import migrate

    settings = _settings()
    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    started: list[LocalRedis | LocalPostgres] = []
    children: list[subprocess.Popen] = []
    env = dict(os.environ)
    try:
        if not settings.redis_url:
            redis_server = LocalRedis(data / "redis").start()
            started.append(redis_server)
            env["LEADPIPE_REDIS_URL"] = redis_server.url
            print(f"started Redis       {redis_server.url}  (AOF in {data / 'redis'})")
        if not settings.database_url:
            pg = LocalPostgres(data / "postgres").start()
            started.append(pg)
            env["LEADPIPE_DATABASE_URL"] = pg.url
            print(f"started Postgres    {pg.url}")
        if not settings.ingest_tokens:
            token_file = data / "ingest-token"
            if not token_file.exists():
                token_file.write_text(secrets.token_urlsafe(24) + "\n")
                token_file.chmod(0o600)
            env["LEADPIPE_INGEST_TOKENS"] = token_file.read_text().strip()
        settings = Settings.from_env(env)
        assert settings.database_url
        migrate(settings.database_url)
        (data / "env").write_text("".join(
            f"export {k}='{env[k]}'\n" for k in
            ("LEADPIPE_REDIS_URL", "LEADPIPE_DATABASE_URL", "LEADPIPE_INGEST_TOKENS")))
        me = [sys.executable, "-m", "config.cli"]
        children.append(subprocess.Popen([*me, "worker"], env=env))
        children.append(subprocess.Popen(
            api_command(settings, args.host, args.port, args.workers, args.server), env=env))
        url = f"http://{args.host}:{args.port}/webhooks/rdstation"
        print(f"""
Leadpipe is running. Post an RD Station webhook:

  curl -s -X POST "{url}?token=$(cat {data / 'ingest-token'})" \\
       -H 'Content-Type: application/json' \\
       --data-binary @../shared/fixtures/rdstation/mkt-v2-converted.json

Settings for other shells: source {data / 'env'}     Stop: Ctrl-C
""", flush=True)
        return _wait(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in reversed(started):
            server.stop()


def _wait(children: list[subprocess.Popen]) -> int:
    stop = {"now": False}

    def handler(signum: int, frame: object) -> None:
        stop["now"] = True

    # set both explicitly: a shell starting us in the background may have ignored SIGINT
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"]:
        for child in children:
            if child.poll() is not None:
                print(f"a Leadpipe process exited with code {child.returncode}; stopping",
                      file=sys.stderr)
                return 1
        time.sleep(0.2)
    print("stopping...", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leadpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add_server_options(sp: argparse.ArgumentParser, port: int) -> None:
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=port)
        sp.add_argument("--workers", type=int, default=os.cpu_count() or 1)
        sp.add_argument("--threads", type=int, default=4)
        sp.add_argument("--server", choices=SERVERS, default="gunicorn")

    run = sub.add_parser("run", help="all-in-one: local Redis/Postgres if unset, API and worker")
    add_server_options(run, 8000)
    run.set_defaults(func=cmd_run)
    api = sub.add_parser("api", help="the ingest API under a production server")
    add_server_options(api, 8000)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="a Celery worker node (with its ingest pump)")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--queues", help="comma-separated Celery queues (default: all of ours)")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    q = sub.add_parser("quarantine", help="bodies that could not be understood")
    q.add_argument("action", choices=("list", "replay"))
    q.add_argument("id", nargs="?")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_quarantine)
    sub.add_parser("config", help="list every LEADPIPE_* setting").set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, LookupError) as exc:
        print(f"leadpipe: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
