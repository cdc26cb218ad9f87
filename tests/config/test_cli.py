"""`leadpipe` commands given bad input or unreachable stores: one clear line, never a traceback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def refused(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`leadpipe ARGS` expected to refuse to start: one that starts instead is stopped (its
    process group, as Ctrl-C would, then killed) and the test fails."""
    child = subprocess.Popen([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, **settings.to_env(), **env},
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # all stopped already
                os.killpg(child.pid, signal.SIGKILL)
        pytest.fail(f"`leadpipe {' '.join(args)}` started")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def one_clear_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
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
    (("dead-letters", "replay", "99999999999999999999"), {},
     ["A dead-letter id", "must be a number from 1 to"]),
    (("dead-letters", "replay", "--sink", "ghost"), {}, ["no sink 'ghost'"]),
    (("dead-letters", "list", "--limit", "-1"), {}, ["--limit", "from 1 to 100000"]),
    (("quarantine", "list", "--limit", "0"), {}, ["--limit"]),
    (("status", "--timeout", "nan"), {}, ["--timeout"]),
    (("purge",), {"LEADPIPE_RETAIN_QUARANTINE_DAYS": "100000000"}, ["from 0 to 36500"]),
    (("nosuch",), {}, ["invalid choice: 'nosuch'", "leadpipe --help"]),
    ((), {}, ["required: command"]),
    (("api", "--port", "70000"), {}, ["--port must be a number from 1 to 65535"]),
    (("run", "--port", "-1"), {}, ["--port must be a number from 1 to 65535"]),
    (("flower", "--port", "0", "--no-auth"), {}, ["--port must be a number from 1 to 65535"]),
    (("worker", "--concurrency", "0"), {}, ["--concurrency must be a number from 1"]),
    (("api", "--threads", "x"), {}, ["--threads must be a number from 1"]),
    (("tokens", "revoke", "\u0663"), {}, ["A token ID"]),  # ARABIC-INDIC DIGIT THREE
    (("tokens", "revoke", "\u00b2"), {}, ["A token ID"]),
    (("dead-letters", "replay", "--sink", "x", "--since", "garbage"), {},
     ["--since must be an ISO-8601 time"]),
    (("dead-letters", "list", "--since", "2026-01-01T00:00:00+99:00"), {},
     ["--since must be an ISO-8601 time"]),
    (("dead-letters", "replay", "--sink", "subscription:nope"), {}, ["no subscription 'nope'"]),
    (("dead-letters", "list", "--sink", "ghost"), {}, ["no sink 'ghost'"]),
    (("status",), {"LEADPIPE_CLAIM_IDLE_SECONDS": "9999999999999999"},
     ["LEADPIPE_CLAIM_IDLE_SECONDS", "from 1 to 1_000_000_000"]),
    (("status",), {"LEADPIPE_REDIS_TIMEOUT_SECONDS": "1e308"},
     ["LEADPIPE_REDIS_TIMEOUT_SECONDS", "at most 86400"]),
    (("status",), {"LEADPIPE_RELAY_AFTER_SECONDS": "9999999999999"},
     ["LEADPIPE_RELAY_AFTER_SECONDS"]),
    (("status",), {"LEADPIPE_OPS_SESSION_HOURS": "1000000000"}, ["LEADPIPE_OPS_SESSION_HOURS"]),
    (("status",), {"LEADPIPE_PLATFORM_ACCOUNT_ID": "99999999999999999999"},
     ["LEADPIPE_PLATFORM_ACCOUNT_ID", "from 0 to 9223372036854775807"]),
    (("status",), {"LEADPIPE_PLATFORM_ACCOUNT_ID": "-1"}, ["LEADPIPE_PLATFORM_ACCOUNT_ID"]),
    (("status",), {"LEADPIPE_REDIS_URL": "redis://h:notaport/0"}, ["LEADPIPE_REDIS_URL"]),
    (("status",), {"LEADPIPE_REDIS_URL": "http://h/0"}, ["LEADPIPE_REDIS_URL", "redis://"]),
])
def test_bad_input(settings, args, env, words):
    one_clear_line(leadpipe(settings, *args, **env), 2, *words)


def test_the_server_logging_config_is_written_where_only_this_user_can(settings, tmp_path,
                                                                       monkeypatch):
    """The server imports what that file names: it must not be a file another local user could
    have placed (a fixed name in /tmp) or could change."""
    import stat
    import tempfile

    from config.cli import server_log_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = server_log_config(settings)
    assert path.parent == tmp_path / f"leadpipe-{os.getuid()}"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert '"config.logs.JsonFormatter"' in path.read_text()
    # another setting, another file: servers started at once never swap configs
    other_settings = server_log_config(settings.with_(log_pii=not settings.log_pii))
    assert other_settings != path and path.exists()
    assert server_log_config(settings) == path

    # that name already taken by a folder open to others, or by a symlink: not used
    for taken in ("open", "link"):
        shutil.rmtree(path.parent)
        if taken == "open":
            path.parent.mkdir(mode=0o777)
            path.parent.chmod(0o777)
        else:
            (tmp_path / "elsewhere").mkdir(mode=0o700, exist_ok=True)
            path.parent.symlink_to(tmp_path / "elsewhere")
        other = server_log_config(settings)
        assert other.parent != path.parent and other.parent.parent == tmp_path
        assert stat.S_IMODE(other.parent.stat().st_mode) == 0o700
        if taken == "link":
            path.parent.unlink()


@pytest.mark.parametrize("args", [("quarantine", "list"), ("tokens", "list"), ("status",),
                                  ("erase", "--email", "a@example.com"), ("migrate",)])
@pytest.mark.parametrize("url", ["postgresql+psycopg://leadpipe:hunter2pw@127.0.0.1:1/x",
                                 "mysql://leadpipe:hunter2pw@127.0.0.1:1/x",
                                 "leadpipe:hunter2pw@127.0.0.1:1/x"])
def test_a_database_url_of_another_kind_is_refused_without_showing_it(settings, args, url):
    result = leadpipe(settings, *args, LEADPIPE_DATABASE_URL=url)
    one_clear_line(result, 2, "LEADPIPE_DATABASE_URL", "postgresql://")
    assert "hunter2pw" not in result.stderr + result.stdout


@pytest.mark.parametrize("args", [("quarantine", "list"), ("tokens", "list"),
                                  ("dead-letters", "list"), ("sinks", "list")])
def test_a_database_that_is_not_migrated_says_run_migrate(settings, db, args):
    db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    one_clear_line(leadpipe(settings, *args), 1, "not migrated", "leadpipe migrate")


def test_a_database_migrated_by_a_newer_version_is_one_line(settings, db, tmp_path):
    db.execute("UPDATE alembic_version SET version_num = '0099'")
    one_clear_line(leadpipe(settings, "migrate"), 2, "migrations:", "0099")
    # `leadpipe run` migrates too, before it starts anything
    result = refused(settings, "run", "--port", str(free_port()),
                     LEADPIPE_DATA_DIR=str(tmp_path / "data"))
    one_clear_line(result, 2, "migrations:", "0099")


def test_replaying_dead_letters_that_are_not_waiting_fails(settings):
    result = leadpipe(settings, "dead-letters", "replay", "999")
    assert "replayed 0 dead letter(s)" in result.stdout
    one_clear_line(result, 2, "1 of the dead letters named were not waiting")


def test_routes_explain_refuses_a_hint_the_endpoint_refuses(settings, tmp_path):
    body = tmp_path / "legacy.json"
    body.write_text('{"leads": [{"email": "a@example.com"}]}')
    one_clear_line(leadpipe(settings, "routes", "explain", str(body), "--event-type", "BOGUS"),
                   2, "--event-type must be WEBHOOK.CONVERTED or WEBHOOK.MARKED_OPPORTUNITY")


@pytest.mark.parametrize("name, text, words", [
    ("routes.yaml", "sinks:\n  crm: {type: dummy\nroutes: [\n", ["not valid YAML", "line 3"]),
    ("routes.toml", "sinks = [\n", ["not valid TOML"]),
])
def test_a_broken_routing_file_is_one_line(settings, tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    one_clear_line(leadpipe(settings, "routes", "check", str(path)), 2, *words)


@pytest.mark.parametrize("url, code", [
    ("postgresql://leadpipe:hunter2pw/x@127.0.0.1:1/x", 2),  # a "/" read as the port's end
    ("postgresql://leadpipe:hunter2pw?x@127.0.0.1:1/x", 2),
    ("postgresql://leadpipe:hunter2pw%zz@127.0.0.1:1/x", 1),  # libpq refuses the escape
    # libpq ends the password at the first "@" and showed the rest as the host it looked up
    ("postgresql://leadpipe:s3cr@hunter2pw@127.0.0.1:1/x", 2),
    ("redis://:s3cr@hunter2pw@127.0.0.1:1/0", 2),
])
def test_a_password_that_breaks_the_url_is_never_shown(settings, url, code):
    name = "LEADPIPE_REDIS_URL" if url.startswith("redis") else "LEADPIPE_DATABASE_URL"
    result = leadpipe(settings, "quarantine", "list", **{name: url})
    one_clear_line(result, code, name)
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["worker --queues {namespace}.default", "api --port {port}",
                                     "run --port {port}"], ids=["worker --queues", "api", "run"])
def test_every_start_refuses_a_broken_routing_file(settings, tmp_path, command):
    # without the check, a node started with --queues (or the API) ran, and every task failed
    routes = tmp_path / "routes.yaml"
    routes.write_text("sinks: {crm: {type: dummy, options: {path: x}, rate_limit: 0/s}}\n"
                      "routes: [{to: [crm]}]\n")
    args = command.format(namespace=settings.namespace, port=free_port()).split()
    result = refused(settings.with_(routes_file=str(routes)), *args,
                     LEADPIPE_DATA_DIR=str(tmp_path / "data"))
    one_clear_line(result, 2, "routes.yaml", "rate_limit")
    assert not (tmp_path / "data").exists()  # `run` started nothing



@pytest.mark.parametrize("host, bound", [("::", "[::]:8000"), ("::1", "[::1]:8000"),
                                         ("0.0.0.0", "0.0.0.0:8000"), ("", ":8000")])
def test_an_ipv6_host_is_bracketed_where_a_port_follows_it(settings, host, bound):
    # gunicorn read `:::8000` as an empty port; the banner printed http://:::8000/...
    from config.cli import api_command, host_port

    command = api_command(settings, host, 8000, 1, "gunicorn", 4)
    assert command[command.index("-b") + 1] == bound
    assert host_port(host, 8000) == bound
