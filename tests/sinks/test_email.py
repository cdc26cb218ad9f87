"""The email sink against a real SMTP server and a real database: once per recipient, outcomes."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from config.local import LocalPostgres, free_port
from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.email import EMAIL_SENT_DDL, EmailSink, PostgresLedger
from sinks.registry import SinkConfigError, build, load_options, sink_class
from tests.conftest import count, fixture_bytes
from tests.sinks.test_postgres import events
from tests.support.smtp_server import SmtpServer, self_signed
from workers.events import Event

SALES = ["ana@sales.example.com", "bruno@sales.example.com"]
SENDER = "leadpipe@example.com"
INSTANCE = "mail-sales"

OPPORTUNITY_BODY = """\
Maria Souza was marked as an opportunity in RD Station Marketing.

Name:       Maria Souza
E-mail:     maria.souza@example.com.br
Phone:      +55 11 91234-5678
Company:    Loja Exemplo Ltda
Job title:  Gerente de Marketing
Location:   São Paulo, SP
Stage:      Qualified Lead
Fit:        60
Interest:   45
Owner:      vendas@example.com.br

Event WEBHOOK.MARKED_OPPORTUNITY at 2025-03-10 10:14-03:00 (Leadpipe id {event_id})
"""


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def ledger(database_url: str) -> Iterator[PostgresLedger]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(EMAIL_SENT_DDL)
    ledger = PostgresLedger(database_url)
    yield ledger
    ledger.close()


def options(server: SmtpServer | tuple[str, int], **extra: Any) -> dict[str, Any]:
    host, port = server if isinstance(server, tuple) else (server.host, server.port)
    return {"host": host, "port": port, "security": "none", "from": SENDER,
            "to": list(SALES), "timeout": 5, **extra}


def make_sink(server: SmtpServer | tuple[str, int], ledger: Any, **extra: Any) -> EmailSink:
    return EmailSink(INSTANCE, load_options(INSTANCE, "email", options(server, **extra)),
                     ledger=ledger)


def opportunity() -> Event:
    (event,) = events(fixture_bytes("mkt-v2-marked-opportunity.json"))
    return event


def deal_won() -> Event:
    (event,) = events(fixture_bytes("crm-deal-updated-won.json"))
    return event


def sent_rows(database_url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT dedup_key, recipient, message_id FROM email_sent "
                            "ORDER BY recipient").fetchall()


def test_opportunity_sends_one_message_per_recipient_with_the_default_template(
        smtp, ledger, database_url):
    event = opportunity()
    before = datetime.now(UTC).replace(microsecond=0)
    make_sink(smtp, ledger).deliver(event)

    received = smtp.messages
    assert [(r.mail_from, r.rcpt_tos) for r in received] == [(SENDER, (to,)) for to in SALES]
    for r, to in zip(received, SALES, strict=True):
        msg = r.message
        assert msg["From"] == SENDER
        assert msg["To"] == to
        assert msg["Subject"] == "New opportunity: Maria Souza (Loja Exemplo Ltda)"
        assert msg.get_content() == OPPORTUNITY_BODY.format(event_id=event.id)
        assert msg.get_content_type() == "text/plain"
        digest = hashlib.sha256(f"{event.dedup_key}\x00{to}\x00{INSTANCE}".encode()
                                ).hexdigest()[:40]
        assert msg["Message-ID"] == f"<{digest}@leadpipe>"
        assert msg["X-Leadpipe-Event-Id"] == event.id
        assert parsedate_to_datetime(msg["Date"]) >= before
    assert received[0].message["Message-ID"] != received[1].message["Message-ID"]
    assert sent_rows(database_url) == [
        (event.dedup_key, to, r.message["Message-ID"]) for to, r in zip(SALES, received,
                                                                        strict=True)]


def test_the_same_event_again_sends_nothing_more(smtp, ledger, database_url):
    event = opportunity()
    make_sink(smtp, ledger).deliver(event)
    make_sink(smtp, ledger).deliver(event)  # the task ran again, maybe in another worker
    again = PostgresLedger(database_url)
    make_sink(smtp, again).deliver(opportunity())  # the same RD event received once more
    again.close()
    assert len(smtp.messages) == 2
    assert smtp.connections == 1  # all recipients already sent: not even a connection


def test_two_email_sinks_each_send_their_own_message_to_a_shared_recipient(smtp, ledger,
                                                                            database_url):
    event = opportunity()
    alert = {"WEBHOOK.MARKED_OPPORTUNITY": {"subject": "Manager alert", "body": "{{ lead.name }}"}}
    make_sink(smtp, ledger).deliver(event)
    managers = EmailSink("mail-managers", load_options("mail-managers", "email", options(
        smtp, templates=alert)), ledger=ledger)
    managers.deliver(event)
    managers.deliver(event)  # and each still once
    subjects = sorted(m.message["Subject"] for m in smtp.messages)
    assert subjects == ["Manager alert"] * 2 + ["New opportunity: Maria Souza (Loja Exemplo "
                                                "Ltda)"] * 2
    assert len({m.message["Message-ID"] for m in smtp.messages}) == 4
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT sink, count(*) FROM email_sent GROUP BY sink ORDER BY sink"
                            ).fetchall() == [("mail-managers", 2), (INSTANCE, 2)]


def test_a_row_from_before_sinks_were_told_apart_still_counts_for_every_sink(smtp, ledger,
                                                                              database_url):
    event = opportunity()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO email_sent (dedup_key, recipient, message_id) VALUES "
                     "(%s, %s, '<old@leadpipe>')", (event.dedup_key, SALES[0].lower()))
    make_sink(smtp, ledger).deliver(event)
    assert [m.message["To"] for m in smtp.messages] == [SALES[1]]  # the first was sent before


class _EndsTheLedgerSession(EmailSink):
    """Postgres ends the ledger's session just as the server takes the first message (a
    restart, a failover, an idle session killed)."""

    def _send(self, smtp: Any, message: Any, recipient: str, deadline: Any) -> None:
        super()._send(smtp, message, recipient, deadline)
        if not getattr(self, "ended", False):
            self.ended = True
            pid = self.ledger._conn.info.backend_pid
            with psycopg.connect(self.ledger.dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_ledger_session_that_dies_mid_send_sends_nothing_twice(smtp, ledger, database_url):
    sink = _EndsTheLedgerSession(INSTANCE, load_options(INSTANCE, "email", options(smtp)),
                                 ledger=ledger)
    sink.deliver(opportunity())  # no error: the ledger's write went through a new session
    assert sorted(m.message["To"] for m in smtp.messages) == sorted(SALES)
    assert len(sent_rows(database_url)) == 2
    make_sink(smtp, ledger).deliver(opportunity())  # a retry finds both marked
    assert len(smtp.messages) == 2


def test_a_money_filter_on_a_huge_raw_value_shows_it_as_given():
    from sinks.email import _money

    assert _money("1234.5") == "1,234.50"
    assert _money("1e999999999") == "1e999999999"  # not 1.3 GB of digits
    assert _money("x" * 1000) == "x" * 64
    assert _money("NaN") == "NaN"


@pytest.mark.parametrize("tag", ["{% include 'footer.j2' %}", "{% extends 'base.j2' %}",
                                 "{% import 'macros.j2' as m %}"])
def test_a_template_that_needs_another_file_stops_start_up(tag):
    opts = {"host": "127.0.0.1", "from": SENDER, "to": SALES,
            "templates": {"WEBHOOK.MARKED_OPPORTUNITY": {"subject": "x", "body": tag}}}
    with pytest.raises(SinkConfigError, match="uses include, extends or import"):
        load_options(INSTANCE, "email", opts)


def test_custom_template_from_options_missing_values_render_empty(smtp, ledger):
    templates = {"WEBHOOK.MARKED_OPPORTUNITY": {
        "subject": "Opportunity {{ lead.name }}\n{{ contact.cf_segmento }}",
        "body": "{{ lead.email }} / {{ contact.cf_segmento }} / [{{ lead.website }}]"
                "[{{ nothing.here }}][{{ deal.name }}]"}}
    make_sink(smtp, ledger, templates=templates).deliver(opportunity())
    msg = smtp.messages[0].message
    assert msg["Subject"] == "Opportunity Maria Souza Varejo"  # one header line
    assert msg.get_content() == "maria.souza@example.com.br / Varejo / [][][]\n"


def test_template_dir_overrides_the_default_and_options_override_the_dir(smtp, ledger,
                                                                         tmp_path: Path):
    (tmp_path / "crm_deal_updated.subject.j2").write_text(
        "Deal {{ deal.status }}: {{ deal.name }}\n", encoding="utf-8")
    (tmp_path / "crm_deal_updated.txt.j2").write_text(
        "{{ deal.amount_total|money }} by {{ document.user.name }}\n", encoding="utf-8")
    (tmp_path / "README").write_text("not a template")
    (tmp_path / "WEBHOOK.MARKED_OPPORTUNITY.txt.j2").write_text("dir body {{ lead.name }}")
    sink = make_sink(smtp, ledger, template_dir=str(tmp_path), to=SALES[:1], templates={
        "WEBHOOK.MARKED_OPPORTUNITY": {"subject": "options subject"}})
    sink.deliver(deal_won())
    sink.deliver(opportunity())
    deal, lead = (r.message for r in smtp.messages)
    assert deal["Subject"] == "Deal won: Contrato anual - Loja Exemplo"
    assert deal.get_content() == "7,500.00 by Ana Vendas\n"
    assert lead["Subject"] == "options subject"
    assert lead.get_content() == "dir body Maria Souza\n"


def test_default_deal_template_has_what_sales_needs(smtp, ledger):
    make_sink(smtp, ledger, to=SALES[:1]).deliver(deal_won())
    msg = smtp.messages[0].message
    assert msg["Subject"] == "Deal updated: Contrato anual - Loja Exemplo (won)"
    body = msg.get_content()
    for line in ("Status:     won", "Amount:     7,500.00 total (500.00 monthly, 1,500.00 one-off)",
                 "Stage:      Fechamento (Funil Padrão)",
                 "Owner:      ana@example.com.br (Ana Vendas)"):
        assert line in body.splitlines()


@pytest.mark.parametrize("where", ["options", "template_dir", "build"])
def test_a_broken_template_stops_start_up_naming_sink_and_event_type(where, tmp_path: Path):
    opts: dict[str, Any] = {"host": "127.0.0.1", "from": SENDER, "to": SALES}
    if where == "template_dir":
        (tmp_path / "crm_deal_updated.txt.j2").write_text("{% if deal.name %}no end")
        opts["template_dir"] = str(tmp_path)
        event_type = "crm_deal_updated"
    else:
        opts["templates"] = {"WEBHOOK.MARKED_OPPORTUNITY": {"subject": "x",
                                                            "body": "{{ lead.name }"}}
        event_type = "WEBHOOK.MARKED_OPPORTUNITY"
    with pytest.raises(SinkConfigError) as caught:
        if where == "build":
            build(INSTANCE, "email", {**opts, "dsn": "postgresql://nowhere.invalid/x"})
        else:
            load_options(INSTANCE, "email", opts)
    text = str(caught.value)
    assert f"sink {INSTANCE!r}" in text and event_type in text and "does not compile" in text


def test_a_template_cannot_change_the_event_it_renders(smtp, ledger):
    templates = {"WEBHOOK.MARKED_OPPORTUNITY": {"subject": "{{ lead.update({'name': 'x'}) }}"}}
    event = opportunity()
    with pytest.raises(PermanentSinkError, match="SecurityError"):
        make_sink(smtp, ledger, templates=templates).deliver(event)
    assert smtp.connections == 0


def test_a_template_that_fails_while_rendering_is_permanent_and_sends_nothing(smtp, ledger):
    templates = {"WEBHOOK.MARKED_OPPORTUNITY": {"subject": "{{ lead.email.split(1, 2, 3) }}"}}
    with pytest.raises(PermanentSinkError, match="WEBHOOK.MARKED_OPPORTUNITY") as caught:
        make_sink(smtp, ledger, templates=templates).deliver(opportunity())
    assert "@" not in str(caught.value)
    assert smtp.connections == 0


@pytest.mark.parametrize("bad, option", [
    ({"hots": "x"}, "hots"),
    ({"to": []}, "to"),
    ({"to": ["not-an-address"]}, "to"),
    ({"security": "tls"}, "security"),
    ({"username": "u"}, "username"),
    ({"templates": {"x": {}}}, "templates"),
    ({"templates": {"custom_type": {"subject": "only a subject"}}}, "custom_type"),
    ({"timeout": 1e300}, "timeout"),
])
def test_bad_options_stop_start_up(bad, option):
    opts = {"host": "127.0.0.1", "from": SENDER, "to": SALES, **bad}
    with pytest.raises(SinkConfigError, match=f"sink '{INSTANCE}'.*{option}"):
        load_options(INSTANCE, "email", opts)


def test_defaults():
    loaded = load_options(INSTANCE, "email", {"host": "h", "from": SENDER, "to": SALES})
    assert (loaded["port"], loaded["security"], loaded["timeout"]) == (587, "starttls", 10.0)
    ssl_port = load_options(INSTANCE, "email", {"host": "h", "from": SENDER, "to": SALES,
                                                "security": "ssl"})["port"]
    assert ssl_port == 465


def test_451_is_retryable_and_the_retry_sends_only_to_who_missed_it(smtp, ledger, database_url):
    event = opportunity()
    sink = make_sink(smtp, ledger)
    smtp.fail_next(451, count=1, stage="DATA")
    with pytest.raises(RetryableSinkError) as caught:
        sink.deliver(event)
    assert caught.value.status == 451
    assert [r.rcpt_tos for r in smtp.messages] == [(SALES[1],)]  # the other one got it
    sink.deliver(event)
    assert [r.rcpt_tos for r in smtp.messages] == [(SALES[1],), (SALES[0],)]
    assert len(sent_rows(database_url)) == 2


@pytest.mark.parametrize("code, stage", [(550, "RCPT"), (554, "DATA"), (553, "MAIL")])
def test_5xx_is_permanent_and_never_names_an_address(smtp, ledger, database_url, code, stage):
    smtp.fail_next(code, count=2, stage=stage)
    with pytest.raises(PermanentSinkError) as caught:
        make_sink(smtp, ledger).deliver(opportunity())
    assert caught.value.status == code
    assert "@" not in str(caught.value)
    assert smtp.messages == [] and sent_rows(database_url) == []


def test_4xx_on_rcpt_is_retryable(smtp, ledger):
    smtp.fail_next(450, count=2, stage="RCPT")
    with pytest.raises(RetryableSinkError) as caught:
        make_sink(smtp, ledger).deliver(opportunity())
    assert caught.value.status == 450 and "@" not in str(caught.value)


def test_server_down_is_retryable(ledger):
    server = SmtpServer().start()
    server.stop()  # the port was just ours and nothing listens there now
    with pytest.raises(RetryableSinkError) as caught:
        make_sink(server, ledger).deliver(opportunity())
    assert caught.value.status is None


def test_server_that_never_answers_is_retryable(ledger):
    with socket.socket() as silent:  # accepts connections (backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        sink = make_sink(silent.getsockname(), ledger, timeout=0.3)
        with pytest.raises(RetryableSinkError):
            sink.deliver(opportunity())


def test_a_server_dripping_its_greeting_is_cut_off_at_the_timeout(ledger):
    # smtplib's timeout bounds each read: a greeting sent as "220-" lines, one at a time,
    # held the worker for as long as the server kept sending them
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stop = threading.Event()

        def drip() -> None:
            conn, _ = listener.accept()
            with conn:
                while not stop.is_set():
                    try:
                        conn.sendall(b"220-still greeting\r\n")
                    except OSError:
                        return
                    stop.wait(0.1)

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        sink = make_sink(listener.getsockname(), ledger, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(RetryableSinkError, match="too slow: connecting"):
            sink.deliver(opportunity())
        took = time.monotonic() - started
        stop.set()
        thread.join(5)
    assert took < 2, took


def test_a_message_answered_late_is_sent_once(smtp, ledger, database_url):
    # the server takes the message and answers after the command timeout: waited for (up to
    # data_timeout), not taken for a failure and sent again on the next try
    smtp.data_delay = 1.5
    sink = make_sink(smtp, ledger, timeout=0.5, data_timeout=5, to=[SALES[0]])
    sink.deliver(opportunity())
    sink.deliver(opportunity())  # a redelivery of the event: the ledger says sent
    assert len(smtp.messages) == 1
    assert len(sent_rows(database_url)) == 1


def test_a_message_answered_after_data_timeout_is_retryable(smtp, ledger, database_url):
    smtp.data_delay = 3
    sink = make_sink(smtp, ledger, timeout=0.5, data_timeout=0.5, to=[SALES[0]])
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="too slow: sending"):
        sink.deliver(opportunity())
    assert time.monotonic() - started < 2.5
    assert sent_rows(database_url) == []


def test_a_server_that_never_answers_quit_holds_nobody_past_the_timeout(ledger):
    # the session's timeout was left at the message's longer one, and QUIT had no deadline:
    # a server that takes the message and then says nothing held the worker that long
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        got: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 smtp.test\r\n")
                data = False
                for line in lines:
                    got.append(line)
                    if data:
                        if line == b".\r\n":
                            data = False
                            conn.sendall(b"250 taken\r\n")
                    elif line.upper().startswith(b"DATA"):
                        data = True
                        conn.sendall(b"354 go on\r\n")
                    elif line.upper().startswith(b"QUIT"):
                        time.sleep(8)  # never answers in time
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        sink = make_sink(listener.getsockname(), ledger, timeout=0.5, data_timeout=5,
                         to=[SALES[0]])
        started = time.monotonic()
        sink.deliver(opportunity())  # delivered: the 250 came
        took = time.monotonic() - started
    assert any(line.upper().startswith(b"QUIT") for line in got)
    assert took < 1.5, took


def test_event_type_without_template_sends_nothing_and_says_so(smtp, ledger, database_url,
                                                                caplog):
    (event,) = events({"event_name": "crm_organization_created", "transaction_uuid": "org-1",
                       "event_timestamp": "2025-03-12T19:40:05.000Z",
                       "document": {"id": "o1", "name": "Loja"}})
    with caplog.at_level(logging.INFO, logger="leadpipe.sinks.email"):
        make_sink(smtp, ledger).deliver(event)
    assert smtp.messages == [] and smtp.connections == 0
    assert sent_rows(database_url) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"email {INSTANCE}: no template for event type crm_organization_created; "
        f"event {event.id} not sent"]


def test_starttls_is_refused_when_the_server_does_not_offer_it(smtp, ledger):
    with pytest.raises(PermanentSinkError):  # never sends in clear what should be encrypted
        make_sink(smtp, ledger, security="starttls").deliver(opportunity())
    assert smtp.messages == []


def test_starttls_and_auth(ledger, tmp_path: Path):
    server_tls, client_tls = self_signed(tmp_path)  # `make setup` installs openssl
    with SmtpServer(users={"leadpipe": "s3cret"}, starttls=server_tls) as server:
        opts = load_options(INSTANCE, "email", options(
            server, security="starttls", username="leadpipe", password="s3cret"))
        EmailSink(INSTANCE, opts, ledger=ledger, tls_context=client_tls).deliver(opportunity())
        assert [r.authenticated_as for r in server.messages] == ["leadpipe", "leadpipe"]

        wrong = {**opts, "password": "wrong"}
        with pytest.raises(PermanentSinkError) as caught:
            EmailSink(INSTANCE, wrong, ledger=ledger, tls_context=client_tls).deliver(deal_won())
        assert caught.value.status == 535

        with pytest.raises(RetryableSinkError):  # the system's CAs do not know this certificate
            EmailSink(INSTANCE, opts, ledger=ledger).deliver(deal_won())
        assert len(server.messages) == 2


def test_registry_finds_email_and_build_uses_the_postgres_ledger(smtp, ledger, database_url):
    assert sink_class("email") is EmailSink
    sink = build(INSTANCE, "email", options(smtp, dsn=database_url, to=SALES[:1]))
    assert isinstance(sink.ledger, PostgresLedger)
    sink.deliver(opportunity())
    sink.close()
    assert len(smtp.messages) == 1
    with psycopg.connect(database_url) as conn:
        assert count(conn, "SELECT count(*) FROM email_sent") == 1
    with pytest.raises(SinkConfigError, match="ledger"):
        build(INSTANCE, "email", options(smtp))


def test_a_temporary_authentication_failure_is_retried_a_refusal_is_not():
    import smtplib

    from sinks.email import classify

    temporary = classify(smtplib.SMTPAuthenticationError(454, b"4.7.0 Temporary failure"))
    refused = classify(smtplib.SMTPAuthenticationError(535, b"5.7.8 Bad credentials"))
    assert isinstance(temporary, RetryableSinkError) and temporary.status == 454
    assert isinstance(refused, PermanentSinkError) and refused.status == 535


def test_an_encoded_word_in_a_lead_field_adds_no_header_and_no_body(smtp, ledger):
    """A form's name field holding an RFC 2047 encoded-word with CR LF in it (no raw CR LF
    anywhere) must stay text in the subject: no Reply-To, no HTML body of the lead's making,
    the message's own Message-ID and text kept."""
    event = opportunity()
    assert event.lead is not None
    event.lead["name"] = ("=?utf-8?q?Ana=0D=0AReply-To:_boss@evil.example=0D=0AContent-Type:"
                          "_text/html=0D=0A=0D=0A<a_href=3Dhttp://evil.example>Urgent</a>?=")
    make_sink(smtp, ledger).deliver(event)
    for received in smtp.messages:
        msg = received.message
        assert msg["Reply-To"] is None and msg.get_content_type() == "text/plain"
        assert msg["Message-ID"] and msg["X-Leadpipe-Event-Id"] == event.id
        assert "Reply-To:_boss@evil.example" in msg["Subject"]  # shown, as text
        headers = received.raw.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nReply-To" not in headers and b"\r\nContent-Type: text/html" not in headers


class _StopsPostgres(EmailSink):
    """Postgres stops just as the server takes the first message, and is back 6 s later."""

    server: LocalPostgres

    def _send(self, smtp: Any, message: Any, recipient: str, deadline: Any) -> None:
        super()._send(smtp, message, recipient, deadline)
        if not getattr(self, "stopped", False):
            self.stopped = True
            self.server.stop()
            self.restart = threading.Timer(6.0, self.server.start)
            self.restart.start()


def test_a_postgres_restart_after_a_send_is_waited_out_and_nothing_is_sent_twice(smtp,
                                                                                 tmp_path):
    """The ledger's write after a send keeps trying through a restart of several seconds
    (the task's retry would send the message again, unmarked)."""
    server = LocalPostgres(tmp_path / "pg", port=free_port()).start()
    ledger = PostgresLedger(server.url, connect_timeout=2)
    sink = _StopsPostgres(INSTANCE, load_options(INSTANCE, "email", options(smtp)),
                          ledger=ledger)
    sink.server = server
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(EMAIL_SENT_DDL)
        sink.deliver(opportunity())  # no error: the marks went in once Postgres was back
        assert sorted(m.message["To"] for m in smtp.messages) == sorted(SALES)
        make_sink(smtp, ledger).deliver(opportunity())  # a retry finds both marked
        assert len(smtp.messages) == 2
        ledger.close()
    finally:
        if restart := getattr(sink, "restart", None):  # never after the discard below
            restart.cancel()
            restart.join()
        server.discard()
