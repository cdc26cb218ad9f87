"""A whole pipeline of real processes for the end-to-end benchmarks: Redis, Postgres, the API,
worker nodes, a CRM, an SMTP server and one subscriber made through the subscription API."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from bench import BenchError, Processes, tail, wait_until
from bench.receivers import Receiver
from config.local import LocalPostgres, LocalRedis, free_port
from config.settings import PREFIX

TOKEN = "bench-ingest-token-0123456789"
QUICK_RETRIES = {"retry_schedule": [1, 2, 4, 8, 15, 15, 15, 15, 15, 15], "quick_retries": 2,
                 "circuit_breaker": {"failures": 50, "cooldown": 1}}


@dataclass(frozen=True)
class Node:
    """One `leadpipe worker` process: its Celery pool size and the queues it serves
    ("store": the ingest and default queues; "deliver": every sink's and the subscriptions';
    "all": every queue, the command's default)."""

    concurrency: int
    role: str = "all"


class Pipeline:
    """The processes of one run, how to read them, and how to hurt them."""

    def __init__(self, root: Path, crm: Receiver, subscriber: Receiver, namespace: str,
                 api_workers: int = 2, settings: dict[str, str] | None = None,
                 postgres_settings: dict[str, str] | None = None, crm_timeout: float = 2.0):
        self.root = root
        self.procs = Processes()
        self.redis = LocalRedis(root / "redis", port=free_port())
        self.postgres = LocalPostgres(root / "postgres", port=free_port(),
                                      settings=postgres_settings)
        self.crm = crm
        self.subscriber = subscriber
        self.namespace = namespace
        self.smtp: Any = None
        self.api_port = free_port()
        self.api_workers = api_workers
        self.extra = settings or {}
        self.crm_timeout = crm_timeout  # the crm sink's timeout per request, in seconds
        self.env: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.workers: list[Any] = []
        self.api_proc: Any = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ingest_url(self) -> str:
        return f"{self.api}/webhooks/rdstation?token={TOKEN}"

    @property
    def stream_key(self) -> str:
        return f"{self.namespace}:ingest"

    def queues(self, role: str) -> str | None:
        """The `--queues` value of a node of `role` (None: the command's default, all)."""
        ns = self.namespace
        if role == "store":
            return f"{ns}.ingest,{ns}.default"
        if role == "deliver":
            return f"{ns}.sink.crm,{ns}.sink.sales-email,{ns}.subscriptions"
        return None

    def start(self, nodes: list[Node], quick_retries: bool = True) -> None:
        from sinks.db import migrate
        from tests.support.smtp_server import SmtpServer

        self.redis.start()
        self.postgres.start()
        migrate(self.postgres.url)
        self.crm.listen()
        self.subscriber.listen()
        self.smtp = SmtpServer().start()
        retries = QUICK_RETRIES if quick_retries else {}
        routes = self.root / "routes.yaml"
        routes.write_text(yaml.safe_dump({
            "sinks": {
                "crm": {"type": "crm", "options": {"base_url": self.crm.url,
                                                   "auth_value": "Bearer bench",
                                                   "timeout": self.crm_timeout}, **retries},
                "sales-email": {"type": "email", "options": {
                    "host": "127.0.0.1", "port": self.smtp.port, "security": "none",
                    "from": "leadpipe@example.com", "to": ["sales@example.com"]}, **retries},
            },
            "routes": [{"name": "everything to the CRM", "to": ["crm"]},
                       {"name": "opportunities by e-mail", "to": ["sales-email"],
                        "when": {"event_type": ["WEBHOOK.MARKED_OPPORTUNITY"]}}],
        }))
        settings = {"REDIS_URL": self.redis.url, "DATABASE_URL": self.postgres.url,
                    "INGEST_TOKENS": TOKEN, "ROUTES_FILE": str(routes),
                    "NAMESPACE": self.namespace, "SSRF_ALLOW": "127.0.0.1",
                    "SUBSCRIPTION_SUSPEND_AFTER": "1000000", "LOG_LEVEL": "WARNING",
                    **self.extra}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        self.env.update({PREFIX + k: v for k, v in settings.items()})
        self.api_proc = self.procs.start(
            "api", [sys.executable, "-m", "config.cli", "api", "--port", str(self.api_port),
                    "--workers", str(self.api_workers)], self.root / "api.log", env=self.env)
        wait_until(self._api_up, 60, "the API")
        self.nodes = list(nodes)
        for n in range(len(nodes)):
            self.workers.append(self._worker(n))
        self._subscribe()

    def _api_up(self) -> bool:
        if self.api_proc is not None and self.api_proc.poll() is not None:
            raise BenchError(f"the API exited:\n{self.log('api')}")
        try:
            return requests.get(self.api + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _worker(self, n: int) -> Any:
        node = self.nodes[n]
        cmd = [sys.executable, "-m", "config.cli", "worker", "--concurrency",
               str(node.concurrency)]
        queues = self.queues(node.role)
        if queues:
            cmd += ["--queues", queues]
        return self.procs.start(f"worker-{n}", cmd, self.root / f"worker-{n}.log", env=self.env)

    def _subscribe(self) -> None:
        from ingest import tokens

        token = tokens.create(self.postgres.url, "bench")
        answer = requests.post(self.api + "/integrations/webhooks", timeout=10, json={
            "event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
            "url": self.subscriber.url + "/hook", "http_method": "POST"},
            headers={"Authorization": f"Bearer {token}"})
        if answer.status_code != 201:
            raise BenchError(f"could not subscribe: {answer.status_code} {answer.text}")

    def log(self, name: str, lines: int = 20) -> str:
        return tail(self.root / f"{name}.log", lines)

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of the API and worker nodes no longer running (a killed node is
        restarted, so one listed here stopped on its own)."""
        return [(name, proc.returncode)
                for name, proc in [("api", self.api_proc)] + [
                    (f"worker-{n}", p) for n, p in enumerate(self.workers)]
                if proc is not None and proc.poll() is not None]

    def check_alive(self) -> None:
        """Raise when the API or a worker node has died (a benchmark must not wait on it)."""
        for name, code in self.exited():
            raise BenchError(f"{name} exited with code {code}:\n{self.log(name)}")

    def roots(self) -> dict[str, list[int]]:
        """Process-tree roots by part, for CPU and memory accounting."""
        groups = {"api": [self.api_proc.pid], "workers": [w.pid for w in self.workers]}
        if self.postgres.proc:
            groups["postgres"] = [self.postgres.proc.pid]
        if self.redis.proc:
            groups["redis"] = [self.redis.proc.pid]
        return groups

    # -- faults --------------------------------------------------------------------------------

    def kill_worker(self, n: int) -> None:
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
