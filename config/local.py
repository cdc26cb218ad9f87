"""Local Redis and Postgres servers for `leadpipe run` and the tests, from installed binaries."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from config.settings import ConfigError

PIDFILE = "redis-server.pid"  # in a LocalRedis folder while its server runs
# the signals that stop `leadpipe run` (a terminal's Ctrl-C, a supervisor, a closed terminal)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else any free port on 127.0.0.1."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port")


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path | None,
              timeout: float = 30, host: str = "127.0.0.1") -> None:
    """Return once `proc` listens on `host`:`port`; raise (with its log's tail, when it writes
    one) if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if log is None:
                raise ConfigError(f"{what} exited with code {proc.returncode} (output above)")
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ConfigError(f"{what} exited with code {proc.returncode}; {log} ends with:\n  "
                              + "\n  ".join(tail))
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends (then the first one that
    came is raised again, for the handler in place): a process started in the block is
    recorded before a handler can run, so it is never left behind. (Recorded, not blocked:
    a child inherits a blocked signal mask, and a server started so would ignore SIGTERM.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers belong to the main thread, which alone runs them
        return
    came: list[int] = []
    before = {signum: signal.signal(signum, lambda signum, frame: came.append(signum))
              for signum in STOPPING}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if came:
            signal.raise_signal(came[0])


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
               timeout: float = 30) -> None:
    """Signal a process started in a session of its own (its whole group) and wait for it;
    SIGKILL the group if it is still there after `timeout`. Members the leader left behind
    when it exited (a server's workers, after a crash of their parent) are killed too."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    # the leader has exited (before this call or in it) or is stuck: nothing of its group may
    # outlive this call (Linux keeps a group's id from reuse while any member lives)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class LocalRedis:
    """A redis-server with AOF (appendfsync always): an acknowledged event survives a crash."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.port = port or free_port(6390)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        binary = shutil.which("redis-server")
        if not binary:
            raise ConfigError("redis-server not found: install it (apt-get install redis-server) "
                              "or set LEADPIPE_REDIS_URL")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._refuse_a_live_one()
        with open(self.dir / "redis.log", "ab") as log, signals_held():  # the server's copy
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                 "--protected-mode", "yes", "--daemonize", "no",
                 "--pidfile", str(self.dir / PIDFILE)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_port(self.port, self.proc, "redis-server", self.dir / "redis.log")
            self._check_ours()
        except BaseException:
            self.stop()  # a server that did not come up as ours is not left running
            raise
        return self

    def _refuse_a_live_one(self) -> None:
        """Two servers appending to one AOF folder would corrupt it: one still running there
        (left by a run that was killed) must be stopped first."""
        try:
            pid = int((self.dir / PIDFILE).read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                alive = b"redis-server" in cmdline.read()
        except (OSError, ValueError):
            return  # no pid file (a clean stop removes it), or no such process now
        if alive:
            raise ConfigError(f"a Redis server (pid {pid}) still serves {self.dir}, left by an "
                              f"earlier run: stop it (kill {pid}) and start again")

    def _check_ours(self) -> None:
        """The port answering is not enough (another server may hold it): ask for its folder."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                wait_port(self.port, self.proc, "redis-server", self.dir / "redis.log")
            try:
                found = client.config_get("dir").get("dir")
                if found and Path(found).resolve() == self.dir.resolve():
                    return
                raise ConfigError(f"port {self.port} is another Redis (serving {found})")
            except redis.BusyLoadingError:
                pass  # replaying its AOF after a restart
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            finally:
                client.close()
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        stop_group(self.proc, signal.SIGKILL if kill else signal.SIGTERM, 30)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise ConfigError(f"{name} not found: install PostgreSQL (apt-get install postgresql) "
                      "or set LEADPIPE_DATABASE_URL")


def _unprivileged_user() -> str | None:
    """Postgres refuses to run as root; as root we run it as the `postgres` user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return "postgres"


def _prune_orphans(base: Path) -> None:
    """Remove the clusters kept in `base` for folders that no longer exist (a test's temporary
    folder, a removed checkout), unless their server is still running."""
    for marker in base.glob("*.folder"):
        data = base / marker.name.removesuffix(".folder")
        try:
            folder = Path(marker.read_text().strip())
        except OSError:
            continue
        if folder.exists() or (data / "postmaster.pid").exists():
            continue
        shutil.rmtree(data, ignore_errors=True)
        marker.unlink(missing_ok=True)


class LocalPostgres:
    """A Postgres cluster in `directory`, listening on 127.0.0.1 with a generated password."""

    def __init__(self, directory: Path, port: int | None = None, database: str = "leadpipe",
                 settings: dict[str, str] | None = None):
        self.dir = Path(directory)
        # server settings (`-c name=value`): room in the lock table for the advisory locks of
        # several batches being stored at once (docs/DEPLOYMENT.md, "Postgres")
        self.settings = {"max_locks_per_transaction": "256", **(settings or {})}
        self.port = port or free_port(5440)
        self.database = database
        self.proc: subprocess.Popen | None = None
        self.user = _unprivileged_user()
        self.data: Path | None = None  # the cluster's folder, once started

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    @property
    def password(self) -> str:
        return (self.dir / "password").read_text().strip()

    @property
    def url(self) -> str:
        return f"postgresql://leadpipe:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _data_dir(self) -> Path:
        """The cluster's folder; as root, one the postgres user can reach if ours is private."""
        data = self.dir / "data"
        if not self.user:
            return data
        reachable = subprocess.run(["runuser", "-u", self.user, "--", "test", "-x", str(self.dir)],
                                   check=False).returncode == 0
        if reachable:
            return data
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:16]  # noqa: S324
        base = Path("/var/lib/leadpipe")
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # noqa: S103 (the server user must traverse it)
        _prune_orphans(base)
        (base / f"{digest}.folder").write_text(f"{self.dir.resolve()}\n")
        return base / digest

    def start(self) -> LocalPostgres:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.data = self._data_dir()
        sockets = data.parent if data.parent != self.dir else self.dir
        if self.user:
            data.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(data.parent, self.user)
        fresh = not (data / "PG_VERSION").exists()
        if not fresh and not (self.dir / "password").exists():
            if data.parent == self.dir:
                raise ConfigError(f"{self.dir / 'password'} is missing, so nobody can log in to "
                                  f"the cluster in {data}; remove {self.dir} to start afresh")
            fresh = True  # a cluster left by an earlier folder of the same path: not ours
        if fresh:
            password = secrets.token_urlsafe(18)
            (self.dir / "password").write_text(password + "\n")
            os.chmod(self.dir / "password", 0o600)
            if self.user and data.exists():
                shutil.rmtree(data)
            pwfile = data.parent / f".pw-{os.getpid()}"  # readable by the server's user only
            pwfile.write_text(password + "\n")
            os.chmod(pwfile, 0o600)
            if self.user:
                shutil.chown(pwfile, self.user)
            try:
                subprocess.run(self._cmd(_pg_bin("initdb"), "-D", str(data), "-U", "leadpipe",
                                         "--pwfile", str(pwfile), "--auth", "scram-sha-256",
                                         "-E", "UTF8", "--no-sync"),
                               check=True, stdout=subprocess.DEVNULL)
            finally:
                pwfile.unlink()
        with open(self.dir / "postgres.log", "ab") as log, signals_held():  # its own copy too
            self.proc = subprocess.Popen(
                self._cmd(_pg_bin("postgres"), "-D", str(data), "-p", str(self.port),
                          "-c", "listen_addresses=127.0.0.1",
                          "-c", f"unix_socket_directories={sockets}",
                          "-c", "max_connections=200", "-c", "shared_buffers=256MB",
                          "-c", "lc_messages=C",  # _check_ours reads the server's refusals
                          *(arg for k, v in self.settings.items() for arg in ("-c", f"{k}={v}"))),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_port(self.port, self.proc, "postgres", self.dir / "postgres.log")
            self._check_ours()
            if fresh:
                self._create_database()
        except BaseException:
            self.stop()  # a server that did not come up as ours is not left running
            raise
        return self

    def _admin_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/postgres"

    _REFUSALS = ("authentication failed", "does not exist")

    def _check_ours(self) -> None:
        """The port answering is not enough (another server may hold it): log in as ourselves."""
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                wait_port(self.port, self.proc, "postgres", self.dir / "postgres.log")
            try:
                psycopg.connect(self._admin_url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                # a server still starting up is waited for; one that knows us not is no
                # better in 30 s (the password file no longer matches the cluster)
                final = any(word in str(exc) for word in self._REFUSALS)
                if final or time.monotonic() > deadline:
                    raise ConfigError(f"postgres on port {self.port} refused us: {exc}") from None
                time.sleep(0.1)

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self, kill: bool = False) -> None:
        stop_group(self.proc, signal.SIGKILL if kill else signal.SIGINT, 60)

    def discard(self) -> None:
        """Stop the server and delete the cluster with its folder, for a throw-away cluster (the
        test suite's): as root the data lives outside that folder, in /var/lib/leadpipe, where
        it would otherwise stay until its folder is gone and another cluster is made."""
        self.stop()
        if self.data is not None and self.data.parent != self.dir:
            shutil.rmtree(self.data, ignore_errors=True)
            (self.data.parent / f"{self.data.name}.folder").unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
