"""`leadpipe run`: the whole pipeline on one machine, with what a second shell needs to reach it."""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from config.cli import SAMPLE, api_command, apply_migrations, check_routing, host_port
from config.local import STOPPING, LocalPostgres, LocalRedis, signals_held, stop_group, wait_port
from config.settings import PREFIX, ConfigError, Settings

# a wildcard address listens on the loopback too, where the banner's curl goes
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class Interrupted(Exception):
    """A signal asked `leadpipe run` to stop while it was still starting."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """Everything on one machine: local Redis/Postgres when unset, migrations, worker and API."""
    # from the first moment: SIGTERM or SIGHUP (their default kills us on the spot) or Ctrl-C
    # while servers start must still stop what was started, in the `finally` below
    for signum in STOPPING:
        signal.signal(signum, _interrupt)
    settings = Settings.from_env()
    check_routing(settings)  # before anything starts: nothing to undo
    check_port_free(args.host, args.port)
    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    started: list[LocalRedis | LocalPostgres] = []
    children: list[subprocess.Popen] = []
    env = dict(os.environ)
    try:
        if not settings.redis_url:
            redis_server = LocalRedis(data / "redis")
            started.append(redis_server)  # before it starts: stopped if interrupted meanwhile
            redis_server.start()
            env["LEADPIPE_REDIS_URL"] = redis_server.url
            print(f"started Redis       {redis_server.url}  (AOF in {data / 'redis'})")
        if not settings.database_url:
            pg = LocalPostgres(data / "postgres")
            started.append(pg)
            pg.start()
            env["LEADPIPE_DATABASE_URL"] = pg.url
            print(f"started Postgres    {pg.url.replace(pg.password, '***')}  "
                  f"(password in {data / 'postgres' / 'password'})")
        if not settings.ingest_tokens:
            env["LEADPIPE_INGEST_TOKENS"] = secret_file(data / "ingest-token")
        if not settings.admin_tokens:
            env["LEADPIPE_ADMIN_TOKENS"] = secret_file(data / "admin-token")
        settings = Settings.from_env(env)
        assert settings.database_url
        apply_migrations(settings.database_url)
        write_env_file(data / "env", env)
        me = [sys.executable, "-m", "config.cli"]
        # each in a session of its own: a terminal's Ctrl-C reaches only this process, which
        # then stops each child's whole process group (a server's workers included)
        with signals_held():  # a child is in the list the moment it exists
            children.append(subprocess.Popen([*me, "worker"], env=env,
                                             start_new_session=True))
            children.append(subprocess.Popen(
                api_command(settings, args.host, args.port, args.workers, args.server,
                            args.threads), env=env, start_new_session=True))
        # the banner's curl must work the moment it is printed
        wait_port(args.port, children[-1], "the API", None, timeout=60,
                  host=_LOOPBACK.get(args.host, args.host))
        base = f"http://{host_port(args.host, args.port)}"
        admin = ("the token in " + str(data / "admin-token") if not os.environ.get(
            PREFIX + "ADMIN_TOKENS") else "a token of LEADPIPE_ADMIN_TOKENS")
        # the secret is never printed: read from the file made for it (URL-safe), or the first
        # of yours from the env file (which holds every setting this run uses), sent in the
        # token header, where a `+` or `&` in it needs no escaping
        env_file = shlex.quote(str(data / "env"))  # a folder's name may hold a space
        url = f"{base}/webhooks/rdstation?token=$(cat {shlex.quote(str(data / 'ingest-token'))})"
        if os.environ.get(PREFIX + "INGEST_TOKENS"):
            url = (f'{base}/webhooks/rdstation" -H "{settings.ingest_token_header}: '
                   f'$(. {env_file} && echo "${{LEADPIPE_INGEST_TOKENS%%,*}}")')
        print(f"""
Leadpipe is running. Post an RD Station webhook:

  curl -s -X POST "{url}" \\
       -H 'Content-Type: application/json' \\
       -d '{SAMPLE}'

Operators: {base}/ops (sign in with {admin})
Other shells (the `leadpipe` command and these settings): . {env_file}     Stop: Ctrl-C
""", flush=True)
        return _wait(children)
    except Interrupted as exc:
        print(f"stopping ({exc} while starting)...", file=sys.stderr)
        return 0
    finally:
        for signum in STOPPING:  # the cleanup is not cut short by a second Ctrl-C
            signal.signal(signum, signal.SIG_IGN)
        for child in children:
            stop_group(child, timeout=20)
        for server in reversed(started):
            server.stop()


def check_port_free(host: str, port: int) -> None:
    """Refuse to start when something already listens where the API would: its banner and
    curl would otherwise point at that other program until our server failed to bind."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host or '*'} is in use ({exc.strerror}): stop what listens "
                f"there, or choose another port: leadpipe run --port {port + 1} "
                f"(make run ARGS='--port {port + 1}')") from None


def secret_file(path: Path) -> str:
    """A generated secret kept in `path` (readable by its owner only) across runs."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """A file another shell sources to talk to this pipeline: every LEADPIPE_* setting it runs
    with, and the `leadpipe` command on PATH. It holds secrets: its owner alone may read it."""
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "'\"'\"'") + "'"

    lines = [f"export {name}={quoted(env[name])}\n"
             for name in sorted(env) if name.startswith(PREFIX)]
    lines.append(f"export PATH={quoted(str(Path(sys.executable).parent))}:\"$PATH\"\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older run may have been readable by all
    with os.fdopen(fd, "w") as out:
        out.write("".join(lines))


def _wait(children: list[subprocess.Popen]) -> int:
    stop = {"now": False}

    def handler(signum: int, frame: object) -> None:
        stop["now"] = True

    # set explicitly: a shell starting us in the background may have ignored SIGINT; SIGHUP
    # (the terminal closed) stops the children too, which no longer share our session
    for signum in STOPPING:
        signal.signal(signum, handler)
    while not stop["now"]:
        for child in children:
            if child.poll() is not None:
                print(f"a Leadpipe process exited with code {child.returncode}; stopping",
                      file=sys.stderr)
                return 1
        time.sleep(0.2)
    print("stopping...", file=sys.stderr)
    return 0
