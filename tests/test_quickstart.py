"""A new user's first minutes: `leadpipe run` with nothing configured, the printed curl, a row."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg
import pytest

from config.local import free_port
from tests.conftest import ROOT, wait_for


def started_with(data_dir: str) -> list[str]:
    """Command lines of the live processes whose environment names this data folder: what
    one `leadpipe run` started (Postgres, run as its own user, clears its environment)."""
    mark = f"LEADPIPE_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
# one after another in one test process: each run's Redis and Postgres take the ports
# `leadpipe run` prefers (6390, 5440), and each checks that its own are free after it stops
@pytest.mark.xdist_group("leadpipe-run")
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sighup"])
def test_run_with_nothing_configured_then_the_printed_curl_gives_a_row(tmp_path, stop):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADPIPE_")}
    data = tmp_path / "run data"  # a space: the banner's commands quote the paths
    env["LEADPIPE_DATA_DIR"] = str(data)
    port = free_port()
    out = tmp_path / "run.out"
    options = ["--port", str(port)]
    own = stop == "sighup"  # one run with tokens of the user's own and server options
    if own:
        env["LEADPIPE_INGEST_TOKENS"] = "own+ingest/token=1&x,own-ingest-token-2"  # base64-ish
        options += ["--threads", "3"]
    with open(out, "wb") as sink:
        run = subprocess.Popen([sys.executable, "-m", "config.cli", "run", *options],
                               cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for(lambda: "Stop: Ctrl-C" in out.read_text(), timeout=120, what="the banner")
        banner = out.read_text()
        curl = re.search(r"^\s*(curl .*?-d '[^']+')$", banner, re.S | re.M)
        assert curl, banner
        assert listening(port), "the banner was printed before the API listened"
        assert "own+ingest" not in banner  # the secret is read, never printed
        # pasted into another shell: none of the run's settings in its environment
        shell = {k: v for k, v in env.items() if not k.startswith("LEADPIPE_")}
        answer = subprocess.run(["bash", "-c", curl.group(1).replace("\\\n", " ")], cwd=ROOT,
                                env=shell, capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        event_id = orjson.loads(answer.stdout)["id"]

        dsn = re.search(r"LEADPIPE_DATABASE_URL='([^']+)'",
                        (data / "env").read_text()).group(1)

        def stored() -> object:
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT e.id, l.email FROM events e JOIN leads l "
                                    "ON l.uuid = e.entity_id").fetchone()

        assert wait_for(stored, timeout=30, what="the lead row") == (event_id,
                                                                     "ana@example.com")
        assert "Operators: " in banner and (data / "admin-token").exists()
        assert (data / "ingest-token").exists() is not own
        servers = [c for c in started_with(env["LEADPIPE_DATA_DIR"]) if " granian " in c]
        assert servers and all(f"--blocking-threads {3 if own else 16} " in c for c in servers)
        assert re.search(r"postgresql://leadpipe:\*\*\*@", banner), banner
        password = (data / "postgres" / "password").read_text().strip()
        assert password not in banner
        env_file = data / "env"
        assert env_file.stat().st_mode & 0o777 == 0o600  # it holds the tokens and the password
        # a second shell: source the file, then the `leadpipe` command and the operator API
        other = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        second = subprocess.run(
            ["bash", "-c", f". {shlex.quote(str(env_file))} && leadpipe quarantine list && "
             "curl -s -H "
             f"\"Authorization: Bearer $LEADPIPE_ADMIN_TOKENS\" "
             f"http://127.0.0.1:{port}/api/sinks"],
            cwd=tmp_path, env=other, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "UNAUTHORIZED" not in second.stdout and '"sinks"' in second.stdout, second.stdout
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", banner)]
    finally:
        if stop == "ctrl-c":  # a terminal sends SIGINT to the whole foreground process group
            os.killpg(run.pid, signal.SIGINT)
        else:  # a supervisor stops the one process it started, or its terminal closed
            run.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGHUP)
        assert run.wait(timeout=90) == 0
    for p in ports:
        assert not listening(p), f"port {p} still open after {stop}"
    assert started_with(env["LEADPIPE_DATA_DIR"]) == [], f"processes left after {stop}"


def test_the_readme_posts_the_same_sample_the_banner_prints():
    from config.cli import SAMPLE

    readme = (ROOT / "README.md").read_text()
    assert f"-d '{SAMPLE}'" in readme
    assert "make run" in readme and "make test" in readme


def test_run_refuses_a_port_in_use_before_starting_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADPIPE_")}
    env["LEADPIPE_DATA_DIR"] = str(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "config.cli", "run", "--port", str(port)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"port {port} on 127.0.0.1 is in use" in run.stderr
    assert f"--port {port + 1}" in run.stderr and "Traceback" not in run.stderr
    assert "Leadpipe is running" not in run.stdout and "started" not in run.stdout
    assert started_with(env["LEADPIPE_DATA_DIR"]) == []


def postgres_of(data_dir: Path) -> list[str]:
    """Command lines of live postgres servers of this data folder's cluster (run as its own
    user, the server is not found by its environment: by its -D folder, where run puts it)."""
    import hashlib

    folder = (data_dir / "postgres").resolve()
    clusters = {str(folder / "data"),
                "/var/lib/leadpipe/" + hashlib.sha1(str(folder).encode()).hexdigest()[:16]}  # noqa: S324
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                args = (proc / "cmdline").read_bytes().split(b"\0")
                if any(a.decode(errors="replace") in clusters for a in args):
                    found.append(b" ".join(args).decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.xdist_group("leadpipe-run")
@pytest.mark.parametrize("stop", ["sigterm", "sighup", "ctrl-c"])
def test_a_run_stopped_while_it_starts_leaves_nothing_running(tmp_path, stop):
    # SIGTERM and SIGHUP used to kill it on the spot (their default) while Redis and Postgres
    # were starting, leaving both (and a second run's Redis on the same AOF folder) behind
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADPIPE_")}
    data = tmp_path / "data"
    env["LEADPIPE_DATA_DIR"] = str(data)
    out = tmp_path / "run.out"
    with open(out, "wb") as sink:
        run = subprocess.Popen([sys.executable, "-m", "config.cli", "run", "--port",
                                str(free_port())], cwd=ROOT, env=env, stdout=sink,
                               stderr=subprocess.STDOUT, start_new_session=True)
    pidfile = data / "redis" / "redis-server.pid"  # Redis writes it once it runs
    try:
        # Redis makes the file, then writes its pid in it: an empty file was read once
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=60,
                 interval=0.01, what="Redis started, Postgres next")
        redis_pid = int(pidfile.read_text())
        if stop == "ctrl-c":
            os.killpg(run.pid, signal.SIGINT)
        else:
            run.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGHUP)
        assert run.wait(timeout=90) == 0, out.read_text()
    finally:
        if run.poll() is None:  # let it stop what it started, then make sure it is gone
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
    text = out.read_text()
    assert not Path(f"/proc/{redis_pid}").exists()
    assert "Leadpipe is running" not in text, "the signal came too late to test the start"
    assert "while starting" in text and "Traceback" not in text, text
    assert started_with(str(data)) == [] and postgres_of(data) == []
    assert not (data / "redis" / "redis-server.pid").exists()  # Redis stopped, not killed
