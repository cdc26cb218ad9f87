"""`leadpipe` commands given bad input or unreachable stores: one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config.local import free_port
from config.settings import Settings
from tests.conftest import ROOT


def leadpipe(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env={**os.environ, **settings.to_env(), **env})


def one_clear_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("args", [("quarantine", "list"), ("dead-letters", "list"),
                                  ("quarantine", "replay", "q-1"), ("migrate",)])
def test_postgres_down(settings, args):
    down = settings.with_(database_url=f"postgresql://x:y@127.0.0.1:{free_port()}/none")
    one_clear_line(leadpipe(down, *args), 1, "Postgres unavailable", "LEADPIPE_DATABASE_URL")


@pytest.mark.parametrize("args", [("sinks", "list"), ("sinks", "pause", "crm")])
def test_redis_down(settings, tmp_path, args):
    routes = tmp_path / "routes.yaml"
    routes.write_text("sinks: {crm: {type: dummy, options: {path: x}}}\nroutes: [{to: [crm]}]\n")
    down = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                          routes_file=str(routes))
    one_clear_line(leadpipe(down, *args), 1, "Redis unavailable", "LEADPIPE_REDIS_URL")


@pytest.mark.parametrize("args, env, words", [
    (("dead-letters", "replay", "99999999999999999999"), {}, ["is not a dead-letter id"]),
    (("dead-letters", "replay", "--sink", "ghost"), {}, ["no sink 'ghost'"]),
    (("dead-letters", "list", "--limit", "-1"), {}, ["--limit", "from 1 to 100000"]),
    (("quarantine", "list", "--limit", "0"), {}, ["--limit"]),
    (("status", "--timeout", "nan"), {}, ["--timeout"]),
    (("purge",), {"LEADPIPE_RETAIN_QUARANTINE_DAYS": "100000000"}, ["from 0 to 36500"]),
])
def test_bad_input(settings, args, env, words):
    one_clear_line(leadpipe(settings, *args, **env), 2, *words)
