"""Every registered sink, built-in or installed as a plugin, through the same contract checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from marshmallow import Schema

from config.local import free_port
from sinks.base import PermanentSinkError, RetryableSinkError, Sink
from sinks.registry import SinkConfigError, available, build, load_options, sink_class
from tests.conftest import fixture_bytes
from tests.sinks.test_postgres import events
from tests.support.http_server import HttpServer
from tests.support.smtp_server import SmtpServer

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, base64


@dataclass
class Target:
    """A real destination for one sink type: options to reach it, and what it received."""

    options: dict[str, Any]
    effects: Callable[[], list[str]]  # one item per delivery *in effect* (after dedup)
    raw: Callable[[], int]  # how many times anything reached it
    down: Callable[[], None]  # make it unreachable


@pytest.fixture
def target(request, tmp_path: Path, database_url: str) -> Iterator[Target]:  # type: ignore[no-untyped-def]
    kind = request.param
    if kind == "postgres":
        def rows(sql: str) -> list[str]:
            with psycopg.connect(database_url) as conn:
                return [r[0] for r in conn.execute(sql)]
        state = {"dsn": database_url}
        yield Target(state, lambda: rows("SELECT dedup_key FROM events"),
                     lambda: sum(1 + int(n) for n in rows("SELECT duplicates FROM events")),
                     lambda: state.update(dsn=f"postgresql://x:y@127.0.0.1:{free_port()}/z"))
    elif kind in ("crm", "webhook"):
        with HttpServer() as server:
            header = "Idempotency-Key" if kind == "crm" else "webhook-id"
            opts = ({"base_url": server.url, "auth_value": "Bearer t", "timeout": 2}
                    if kind == "crm" else {"url": server.url, "secret": SECRET, "timeout": 2})
            yield Target(opts, lambda: sorted({r.header(header) for r in server.requests}),
                         lambda: len(server.requests), server.stop)
    elif kind == "email":
        with SmtpServer() as server:
            yield Target({"host": server.host, "port": server.port, "security": "none",
                          "from": "leadpipe@example.com", "to": ["sales@example.com"],
                          "timeout": 2, "dsn": database_url},
                         lambda: sorted({m.message["Message-ID"] for m in server.messages}),
                         lambda: len(server.messages), server.stop)
    elif kind == "dummy":
        path = tmp_path / "dummy.jsonl"
        state = {"path": str(path)}
        yield Target(state, lambda: path.read_text().splitlines() if path.exists() else [],
                     lambda: len(path.read_text().splitlines()) if path.exists() else 0,
                     lambda: state.update(fail="retryable"))
    else:
        pytest.fail(f"sink type {kind!r} is registered but has no contract target here")


ALL = sorted(available())


def make(kind: str, target: Target) -> Sink:
    return build(f"contract-{kind}", kind, target.options)


def event():  # type: ignore[no-untyped-def]
    (one,) = events(fixture_bytes("mkt-v2-marked-opportunity.json"))
    return one


def test_the_builtins_and_the_installed_plugin_are_registered():
    assert {"postgres", "crm", "email", "webhook", "dummy"} <= set(ALL)


@pytest.mark.parametrize("kind", ALL)
def test_declares_name_options_and_deliver(kind):
    cls = sink_class(kind)
    assert issubclass(cls, Sink) and cls.name == kind
    assert issubclass(cls.Options, Schema)
    assert "deliver" not in getattr(cls, "__abstractmethods__", set())


@pytest.mark.parametrize("kind", ALL)
def test_unknown_option_stops_start_up_naming_sink_and_option(kind):
    with pytest.raises(SinkConfigError) as info:
        load_options(f"contract-{kind}", kind, {"surely_not_an_option": 1})
    assert f"contract-{kind}" in str(info.value) and "surely_not_an_option" in str(info.value)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_delivers_and_a_second_delivery_changes_nothing_in_effect(target):
    sink = make(target_kind(target), target)
    one = event()
    sink.deliver(one)
    assert len(target.effects()) == 1
    sink.deliver(one)
    assert len(target.effects()) == 1
    assert sink.deliver_many([one, one]) == [None, None]
    assert len(target.effects()) == 1
    sink.close()


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_an_unreachable_destination_is_a_retryable_error_never_swallowed(target):
    target.down()
    sink = make(target_kind(target), target)
    with pytest.raises(RetryableSinkError):
        sink.deliver(event())
    outcomes = sink.deliver_many([event()])
    assert len(outcomes) == 1 and isinstance(outcomes[0], RetryableSinkError | Exception)
    assert not isinstance(outcomes[0], PermanentSinkError)
    sink.close()


def target_kind(target: Target) -> str:
    opts = target.options
    if "dsn" in opts and "host" not in opts:
        return "postgres"
    if "base_url" in opts:
        return "crm"
    if "secret" in opts:
        return "webhook"
    if "host" in opts:
        return "email"
    return "dummy"
