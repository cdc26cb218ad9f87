"""JSON log lines: PII masked unless LEADPIPE_LOG_PII, and where lead PII is found in RD bodies."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import orjson
import pytest

from config import pii
from config.logs import JsonFormatter, setup
from ingest.queue import Entry
from sinks.registry import build
from tests.support.http_server import HttpServer
from workers.normalize import normalize


def line(formatter: JsonFormatter, msg: str, *args: object, **extra: object) -> dict:
    record = logging.LogRecord("leadpipe.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return json.loads(formatter.format(record))


def test_pii_is_masked_in_messages_extras_and_nested_values():
    entry = line(JsonFormatter(), "refused %s by +55 11 91234-5678", "maria.souza@example.com.br",
                 event_id="01a2-x", email="ana@example.com.br", lead_name="Ana Vendas",
                 mobile_phone="(34) 90000-0000", details={"to": ["joao@example.com"]})
    assert entry["msg"] == "refused m***@***.br by ***78"
    assert (entry["email"], entry["lead_name"], entry["mobile_phone"]) == ("a***@***.br",
                                                                       "A*** V***", "***00")
    assert entry["details"] == {"to": ["j***@***.com"]}
    assert entry["event_id"] == "01a2-x"  # ids, times and URLs are left alone
    plain = line(JsonFormatter(), "at 2025-03-10T10:14:58+00:00 redis://:**@127.0.0.1:6379/0")
    assert plain["msg"] == "at 2025-03-10T10:14:58+00:00 redis://:**@127.0.0.1:6379/0"


def test_log_pii_setting_keeps_values():
    entry = line(JsonFormatter(log_pii=True), "to %s", "ana@example.com.br", lead_name="Ana Vendas")
    assert entry["msg"] == "to ana@example.com.br" and entry["lead_name"] == "Ana Vendas"


def test_tracebacks_are_masked_too():
    try:
        raise ValueError("Key (email)=(ana@example.com.br) already exists")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ana@example.com.br" not in entry["exc"] and "a***@***.br" in entry["exc"]


def test_person_of_each_body_shape():
    legacy = {"leads": [{"email": "joao@example.com", "name": "João Silva",
                         "personal_phone": None, "mobile_phone": "+55 (34) 90000-0000"}]}
    assert pii.person(legacy) == {"email": "joao@example.com", "name": "João Silva",
                                  "phone": "+55 (34) 90000-0000"}
    assert pii.masked_person(legacy) == {"email": "j***@***.com", "name": "J*** S***",
                                         "phone": "***00"}
    no_email = {"contact": {"uuid": "u", "name": "Só Nome"}}
    assert pii.person(no_email) == {"email": None, "name": "Só Nome", "phone": None}
    assert pii.person({"erased": True}) == {"email": None, "name": None, "phone": None}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup() configures the whole process: put the root and urllib3 loggers back after."""
    root, urllib3 = logging.getLogger(), logging.getLogger("urllib3")
    saved = (root.handlers[:], root.level, urllib3.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    urllib3.setLevel(saved[2])
    logging.captureWarnings(False)


@pytest.mark.parametrize(("level", "urllib3_level"), [
    ("DEBUG", logging.WARNING), ("INFO", logging.WARNING), ("ERROR", logging.ERROR)])
def test_urllib3_logs_no_request_lines_whatever_the_level(restore_logging, level,
                                                          urllib3_level):
    setup(level)
    assert logging.getLogger("urllib3").getEffectiveLevel() == urllib3_level
    assert logging.getLogger("urllib3.connectionpool").getEffectiveLevel() == urllib3_level


def test_a_crm_delivery_at_debug_logs_no_lead_address(restore_logging, capsys):
    setup("DEBUG")  # its handler writes to the sys.stderr capsys put in place
    body = {"leads": [{"email": "maria.souza@example.com.br", "name": "Maria"}]}
    (ev,) = normalize(Entry("1-0", "ev-1", 1_700_000_000_000, orjson.dumps(body), None))
    ev.entity_id = "email:maria.souza@example.com.br"  # the lead_key storing it gives it
    with HttpServer() as server:
        sink = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        sink.deliver(ev)
        sink.close()
        assert server.requests[0].path == "/leads/email%3Amaria.souza%40example.com.br"
    logging.getLogger("leadpipe.test").debug("debug lines do get out")
    err = capsys.readouterr().err
    assert "debug lines do get out" in err
    assert "maria" not in err and "souza" not in err
