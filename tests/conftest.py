"""Real services for the whole suite: one Redis and one Postgres, a fresh database per test."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
import redis

from config.local import LocalPostgres, LocalRedis, free_port, stop_group
from config.settings import Settings
from sinks.db import migrate

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "rdstation"
TOKEN = "test-token-0123456789"
OTHER_TOKEN = "rotated-token-9876543210"


def wait_for(check: Callable[[], object], timeout: float = 30, interval: float = 0.05,
             what: str = "condition") -> object:
    """Poll `check` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _discard_recorders() -> Iterator[None]:
    """Apps a test made in this process stop flushing metrics when it ends: one whose Redis the
    test stopped would otherwise retry for the rest of the run, from a background thread."""
    from workers import metrics

    before = set(metrics._recorders)
    yield
    for recorder in set(metrics._recorders) - before:
        recorder.discard()


@pytest.fixture(scope="session")
def service_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="leadpipe-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)  # after the servers in it stopped (they use it)


@pytest.fixture(scope="session")
def redis_url(service_dir: Path) -> Iterator[str]:
    if os.environ.get("LEADPIPE_TEST_REDIS_URL"):
        yield os.environ["LEADPIPE_TEST_REDIS_URL"]
        return
    server = LocalRedis(service_dir / "redis", port=free_port()).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url(service_dir: Path) -> Iterator[str]:
    """A server with a migrated template database that each test copies."""
    if os.environ.get("LEADPIPE_TEST_DATABASE_URL"):
        admin = os.environ["LEADPIPE_TEST_DATABASE_URL"]
    else:
        server = LocalPostgres(service_dir / "postgres", port=free_port()).start()
        admin = server.url
    template = admin.rsplit("/", 1)[0] + "/leadpipe_template"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS leadpipe_template")
        conn.execute("CREATE DATABASE leadpipe_template")
    migrate(template)
    yield admin
    if not os.environ.get("LEADPIPE_TEST_DATABASE_URL"):
        server.discard()  # its cluster too (as root: ~100 MB under /var/lib/leadpipe per run)


_db_numbers = itertools.count()


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    name = f"t_{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE leadpipe_template")
    yield postgres_admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    """Settings of one test: its own Redis namespace and database, short timings."""
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        ingest_tokens=(TOKEN, OTHER_TOKEN),
        namespace="t" + uuid.uuid4().hex[:10],
        batch_window_ms=20,
        claim_idle_seconds=3,
        worker_concurrency=2,
    )


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def runtime(settings: Settings):  # type: ignore[no-untyped-def]
    """The workers' runtime (pools, clients) on the test's settings, closed afterwards."""
    from workers.runtime import Runtime

    made = Runtime(settings)
    yield made
    made.close()


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from ingest import create_app

    return create_app(settings)


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def post(client, body: bytes, token: str = TOKEN, **kwargs):  # type: ignore[no-untyped-def]
    return client.post(f"/webhooks/rdstation?token={token}", data=body,
                       content_type=kwargs.pop("content_type", "application/json"), **kwargs)


class WorkerProcess:
    """A real `leadpipe worker` in its own process group, so SIGKILL reaches its children."""

    def __init__(self, settings: Settings, log_path: Path, args: Sequence[str] = ()):
        self.settings = settings
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.settings.to_env()}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "config.cli", "worker",
                                          *self.args], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        if "--queues" in self.args and self.settings.ingest_queue not in self.args[
                self.args.index("--queues") + 1].split(","):
            return self._wait_ping()  # a node without the ingest queue runs no pump
        client = redis.Redis.from_url(self.settings.redis_url or "")
        key = self.settings.stream_key

        def pump_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            try:
                consumers = client.xinfo_consumers(key, "workers")
            except redis.ResponseError:
                return False
            return any(c["name"].decode().endswith(f":{self.proc.pid}") for c in consumers)

        wait_for(pump_ready, timeout=60, what="worker start")
        return self

    def _wait_ping(self) -> WorkerProcess:
        from workers.app import make_celery

        app = make_celery(self.settings)
        name = f"leadpipe-{self.proc.pid}@{socket.gethostname()}" if self.proc else ""

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            return bool(app.control.ping(destination=[name], timeout=0.5))

        wait_for(answers, timeout=60, what="worker start")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def worker_factory(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(custom: Settings | None = None, args: Sequence[str] = ()) -> WorkerProcess:
        w = WorkerProcess(custom or settings, tmp_path / f"worker-{len(started)}.log", args)
        started.append(w)  # stopped at the end even when it fails to start
        return w.start()

    yield make
    for w in started:
        w.stop()


@pytest.fixture
def worker(worker_factory: Callable[..., WorkerProcess]) -> WorkerProcess:
    return worker_factory()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    row = conn.execute(sql, params or None).fetchone()
    return int(row[0]) if row else 0


__all__ = ["FIXTURES", "TOKEN", "OTHER_TOKEN", "wait_for", "fixture_bytes", "post", "count",
           "free_port", "WorkerProcess"]


class ServerProcess:
    """`leadpipe COMMAND --port P ARGS...` on a free port in its own process group; ready once
    `health` answers 200."""

    def __init__(self, settings: Settings, log_path: Path, command: list[str], health: str,
                 timeout: float = 30):
        import requests

        self.settings, self.log_path = settings, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings.to_env()}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "config.cli", command[0], "--port", str(self.port),
                 *command[1:]],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{command[0]} exited: {log_path.read_text()[-3000:]}")
            try:
                return requests.get(self.url + health, timeout=1).status_code == 200
            except (requests.ConnectionError, requests.Timeout):  # listening, not serving yet
                return False

        try:
            wait_for(up, timeout=timeout, what=f"{command[0]} start")
        except BaseException:
            stop_group(self.proc)  # a server that never got ready is not left to later tests
            raise

    def stop(self) -> None:
        stop_group(self.proc)


class ApiProcess(ServerProcess):
    """`leadpipe api` under its production server, on a free port."""

    def __init__(self, settings: Settings, log_path: Path, workers: int = 1,
                 server: str | None = None):
        super().__init__(settings, log_path,
                         ["api", "--workers", str(workers),
                          *(["--server", server] if server else [])], "/healthz")


@pytest.fixture
def live_api(settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    api = ApiProcess(settings, tmp_path / "api.log")
    yield api
    api.stop()
