"""Settings: strict converters, one error naming the variable, and the documented table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config.settings import ConfigError, Settings, documented
from tests.conftest import ROOT


def test_defaults():
    s = Settings.from_env({})
    assert s.max_body_bytes == 1024 * 1024
    assert s.ingest_tokens == ()
    assert s.ingest_token_header == "X-Leadpipe-Token"


def test_values_are_converted():
    s = Settings.from_env({"LEADPIPE_INGEST_TOKENS": " a, b ,,c ", "LEADPIPE_BATCH_SIZE": "1_000",
                           "LEADPIPE_LOG_PII": "yes"})
    assert s.ingest_tokens == ("a", "b", "c")
    assert s.batch_size == 1000 and s.log_pii is True


@pytest.mark.parametrize("name, value", [
    ("LEADPIPE_LOG_PII", "yes-ish"), ("LEADPIPE_BATCH_SIZE", "0"),
    ("LEADPIPE_MAX_BODY_BYTES", "1MB"), ("LEADPIPE_LOG_LEVEL", "loud"),
    ("LEADPIPE_REDIS_TIMEOUT_SECONDS", "soon"),
    ("LEADPIPE_NAMESPACE", "acme,eu"),  # a worker's queue list splits at the comma
    ("LEADPIPE_NAMESPACE", "acme eu"), ("LEADPIPE_NAMESPACE", "-x"),
    # an operator token opens erasure and unmasked personal data: never a guessable one
    ("LEADPIPE_ADMIN_TOKENS", "admin"), ("LEADPIPE_ADMIN_TOKENS", "a" * 40 + ",short"),
])
def test_junk_is_refused_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_an_admin_token_s_error_never_shows_it():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LEADPIPE_ADMIN_TOKENS": "a" * 16 + ",hunter2"})
    assert "hunter2" not in str(caught.value) and "16 characters" in str(caught.value)
    assert Settings.from_env({"LEADPIPE_ADMIN_TOKENS": "a" * 16}).admin_tokens == ("a" * 16,)


def test_round_trip_through_the_environment():
    s = Settings(redis_url="redis://x/0", ingest_tokens=("a", "b"), log_pii=True, batch_size=7)
    assert Settings.from_env(s.to_env()) == s


def test_the_readme_table_is_the_one_the_code_prints():
    readme = (ROOT / "README.md").read_text()
    table = subprocess.run([sys.executable, "-m", "config.cli", "config", "--markdown"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    assert table in readme  # regenerate with `leadpipe config --markdown`
    for name, _, doc in documented():
        assert doc and f"`{name}`" in table


def test_bad_setting_stops_a_command_with_a_clear_message():
    env = {**os.environ, "LEADPIPE_BATCH_SIZE": "many"}
    result = subprocess.run([sys.executable, "-m", "config.cli", "migrate"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "LEADPIPE_BATCH_SIZE" in result.stderr and "Traceback" not in result.stderr


def test_documented_defaults_do_not_depend_on_the_machine():
    """The README's table is compared with `leadpipe config --markdown` on whatever machine runs
    the tests: a default computed from the machine is documented by what it is, not its value."""
    shown = {name: default for name, default, _ in documented()}
    assert shown["LEADPIPE_WORKER_CONCURRENCY"] == "(the number of CPUs)"
    assert Settings.from_env({}).worker_concurrency == (os.cpu_count() or 1)


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "0"])
def test_a_timeout_must_be_a_finite_time(raw):
    with pytest.raises(ConfigError, match="seconds above 0"):
        Settings.from_env({"LEADPIPE_REDIS_TIMEOUT_SECONDS": raw})


@pytest.mark.parametrize("url", [
    "postgresql://leadpipe:p%40ss@db.example.com:5432/leadpipe?sslmode=require",
    "postgres://db/leadpipe",
    "postgresql:///leadpipe?host=/var/run/postgresql",
    "postgresql://h1:5432,h2:5433/leadpipe?target_session_attrs=read-write",  # libpq's hosts
    "postgresql://[::1]:5432/leadpipe",
])
def test_database_urls_libpq_takes_are_accepted(url):
    assert Settings.from_env({"LEADPIPE_DATABASE_URL": url}).database_url == url
