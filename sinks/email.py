"""The email sink: a plain-text message per recipient for the events sales cares about."""

from __future__ import annotations

import hashlib
import logging
import smtplib
import socket
import ssl
import threading
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import psycopg
from jinja2 import ChainableUndefined, TemplateError, Undefined, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from ingest.ssrf import Unresolved
from sinks.base import PermanentSinkError, RetryableSinkError, Sink, SinkError
from sinks.transport import Deadline, connect, current_deadline, resolve
from workers.events import Event
from workers.view import view

log = logging.getLogger("leadpipe.sinks.email")

# The once-per-(sink, event, recipient) ledger, as the migrations leave it (0002, 0009); a
# `sink` of '' is a row written before sinks were told apart, which counts for every sink.
EMAIL_SENT_DDL = """
CREATE TABLE IF NOT EXISTS email_sent (
    sink       text        NOT NULL DEFAULT '',
    dedup_key  text        NOT NULL,
    recipient  text        NOT NULL,
    message_id text        NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, dedup_key, recipient)
);
CREATE INDEX IF NOT EXISTS email_sent_dedup_key ON email_sent (dedup_key)
"""
MAX_MONEY_DIGITS = 20  # below 10^20, as workers.fields.Amount takes; past it, shown as given

SUBJECT_SUFFIX = ".subject.j2"
BODY_SUFFIX = ".txt.j2"
DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 587}


# ---------------------------------------------------------------------------------------------
# Default templates: what a salesperson needs to act, in plain text.

_LEAD_FIELDS = """\
Name:       {{ lead.name|dash }}
E-mail:     {{ lead.email|dash }}
Phone:      {{ (lead.mobile_phone or lead.personal_phone)|dash }}
Company:    {{ lead.company|dash }}
Job title:  {{ lead.job_title|dash }}
Location:   {{ [lead.city, lead.state]|select|join(", ")|dash }}
Stage:      {{ funnel.lifecycle_stage|dash }}
Fit:        {{ funnel.fit|dash }}
Interest:   {{ funnel.interest|dash }}
Owner:      {{ funnel.contact_owner_email|dash }}
"""

_EVENT_LINE = """
Event {{ event.type }} at {{ event.occurred_at|when }} (Leadpipe id {{ event.id }})
"""

_LEAD_WHO = "{{ lead.name or lead.email or 'A lead' }}"

_DEAL_FIELDS = """\
Deal:       {{ deal.name|dash }}
Status:     {{ deal.status|dash }}
Amount:     {{ deal.amount_total|money }} total \
({{ deal.amount_monthly|money }} monthly, {{ deal.amount_unique|money }} one-off)
Stage:      {{ deal.stage_name|dash }}{% if deal.pipeline_name %} \
({{ deal.pipeline_name }}){% endif %}
Owner:      {{ deal.owner_email|dash }}{% if document.user and document.user.name %} \
({{ document.user.name }}){% endif %}
Source:     {{ deal.source_name|dash }}
Campaign:   {{ deal.campaign_name|dash }}
Expected:   {{ deal.prediction_date|when }}
Closed:     {{ deal.closed_at|when }}
"""

_DEAL_NAME = "{{ deal.name or 'A deal' }}"

DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    "WEBHOOK.CONVERTED": {
        "subject": "New conversion: " + _LEAD_WHO
                   + "{% if event.identifier %} on {{ event.identifier }}{% endif %}",
        "body": _LEAD_WHO + " converted on {{ event.identifier|dash }} in RD Station Marketing."
                "\n\n" + _LEAD_FIELDS + "Conversion: {{ event.identifier|dash }}\n" + _EVENT_LINE,
    },
    "WEBHOOK.MARKED_OPPORTUNITY": {
        "subject": "New opportunity: " + _LEAD_WHO
                   + "{% if lead.company %} ({{ lead.company }}){% endif %}",
        "body": _LEAD_WHO + " was marked as an opportunity in RD Station Marketing.\n\n"
                + _LEAD_FIELDS + _EVENT_LINE,
    },
    "crm_deal_created": {
        "subject": "New deal: " + _DEAL_NAME,
        "body": _DEAL_NAME + " was created in RD Station CRM.\n\n" + _DEAL_FIELDS + _EVENT_LINE,
    },
    "crm_deal_updated": {
        "subject": "Deal updated: " + _DEAL_NAME
                   + "{% if deal.status %} ({{ deal.status }}){% endif %}",
        "body": _DEAL_NAME + " was updated in RD Station CRM.\n\n" + _DEAL_FIELDS + _EVENT_LINE,
    },
    "crm_deal_deleted": {
        "subject": "Deal deleted: " + _DEAL_NAME,
        "body": _DEAL_NAME + " was deleted in RD Station CRM.\n\n"
                "Deal:       {{ deal.name|dash }}\n" + _EVENT_LINE,
    },
}


# ---------------------------------------------------------------------------------------------
# Templates: a sandbox, missing values render empty, no HTML escaping (the mail is plain text).

def _missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined) or value == ""


def _dash(value: Any) -> Any:
    return "-" if _missing(value) else value


def _money(value: Any) -> str:
    if _missing(value):
        return "-"
    text = str(value)[:64]  # a raw field may hold anything: "1e999999999" is 1.3 GB of digits
    try:
        amount = Decimal(text)
    except ArithmeticError:
        return text
    if not amount.is_finite() or amount.adjusted() >= MAX_MONEY_DIGITS:  # no arithmetic yet
        return text
    return f"{amount:,.2f}"


def _when(value: Any) -> str:
    if _missing(value):
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="minutes")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(  # noqa: S701 (plain-text mail: nothing to escape)
        autoescape=False, undefined=ChainableUndefined, finalize=_finalize)
    env.filters.update(dash=_dash, money=_money, when=_when)
    return env


class Compiled(NamedTuple):
    subject: Any  # jinja2.Template
    body: Any


def _read_template_dir(folder: str) -> dict[str, dict[str, str]]:
    """`<event_type>.subject.j2` and `<event_type>.txt.j2` files, as {type: {part: source}}."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(Path(folder).iterdir()):
        for suffix, part in ((SUBJECT_SUFFIX, "subject"), (BODY_SUFFIX, "body")):
            if path.is_file() and path.name.endswith(suffix) and len(path.name) > len(suffix):
                event_type = path.name[: -len(suffix)]
                found.setdefault(event_type, {})[part] = path.read_text(encoding="utf-8")
    return found


def resolve_templates(options: dict[str, Any]) -> dict[str, Compiled]:
    """Defaults, then template_dir, then `templates`, part by part; compiled. A template that
    does not compile, or an event type left without a subject or a body, is a ValidationError
    naming the option and the event type."""
    layers: list[tuple[str, dict[str, dict[str, str]]]] = [("templates", DEFAULT_TEMPLATES)]
    if options.get("template_dir"):
        try:
            layers.append(("template_dir", _read_template_dir(options["template_dir"])))
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError({"template_dir": [f"cannot read: {type(exc).__name__}"]}) \
                from None
    layers.append(("templates", options.get("templates") or {}))
    sources: dict[str, dict[str, tuple[str, str]]] = {}  # type -> part -> (option, source)
    for option, layer in layers:
        for event_type, given in layer.items():
            for part, text in given.items():
                sources.setdefault(event_type, {})[part] = (option, text)
    env = make_environment()
    compiled: dict[str, Compiled] = {}
    errors: dict[str, dict[str, dict[str, list[str]]]] = {}
    for event_type, parts in sources.items():
        out: dict[str, Any] = {}
        for part in ("subject", "body"):
            if part not in parts:
                option = next(iter(parts.values()))[0]
                errors.setdefault(option, {}).setdefault(event_type, {})[part] = [
                    f"event type {event_type!r} has no {part} template"]
                continue
            option, source = parts[part]
            try:
                if any(True for _ in meta.find_referenced_templates(env.parse(source))):
                    errors.setdefault(option, {}).setdefault(event_type, {})[part] = [
                        f"{part} template of event type {event_type!r} uses include, extends "
                        "or import: each template must be whole (they are not loaded)"]
                    continue
                out[part] = env.from_string(source)
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                where = f" (line {line})" if line else ""
                message = getattr(exc, "message", None) or type(exc).__name__
                errors.setdefault(option, {}).setdefault(event_type, {})[part] = [
                    f"{part} template of event type {event_type!r} does not compile: "
                    f"{message}{where}"]
        if len(out) == 2:
            compiled[event_type] = Compiled(out["subject"], out["body"])
    if errors:
        raise ValidationError(errors)  # type: ignore[arg-type]
    return compiled


# ---------------------------------------------------------------------------------------------
# Options

class TemplatePairSchema(Schema):
    class Meta:
        unknown = RAISE

    subject = fields.String(validate=validate.Length(min=1))
    body = fields.String(validate=validate.Length(min=1))

    @validates_schema
    def _one_part(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError("give a subject, a body, or both")


class EmailOptions(Schema):
    """Options of an email sink; unknown names are refused so a typo stops start-up."""

    class Meta:
        unknown = RAISE

    host = fields.String(required=True, validate=validate.Length(min=1))
    port = fields.Integer(load_default=None, validate=validate.Range(1, 65535))
    security = fields.String(load_default="starttls",
                             validate=validate.OneOf(["starttls", "ssl", "none"]))
    username = fields.String(load_default=None)
    password = fields.String(load_default=None, load_only=True)
    from_ = fields.Email(data_key="from", required=True)
    to = fields.List(fields.Email(), required=True, validate=validate.Length(min=1))
    timeout = fields.Float(load_default=10.0, validate=validate.Range(
        min=0, max=86_400, min_inclusive=False))
    data_timeout = fields.Float(load_default=60.0, validate=validate.Range(
        min=0, max=86_400, min_inclusive=False))
    templates = fields.Dict(keys=fields.String(validate=validate.Length(min=1)),
                            values=fields.Nested(TemplatePairSchema), load_default=None)
    template_dir = fields.String(load_default=None)
    dsn = fields.String(load_default=None)  # the ledger's database when none is passed in

    @validates_schema
    def _credentials(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("username") is None) != (data.get("password") is None):
            raise ValidationError("give both username and password, or neither", "username")
        folder = data.get("template_dir")
        if folder is not None and not Path(folder).is_dir():
            raise ValidationError("not a folder", "template_dir")

    @post_load
    def _finish(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if data["port"] is None:
            data["port"] = DEFAULT_PORTS[data["security"]]
        unique: dict[str, str] = {}
        for address in data["to"]:
            unique.setdefault(address.lower(), address)
        data["to"] = list(unique.values())
        resolve_templates(data)  # compile now: a broken template stops start-up
        return data


# ---------------------------------------------------------------------------------------------
# The ledger: which (event, recipient) pairs were already sent.

class SentKey(NamedTuple):
    sink: str  # the sink instance: two e-mail sinks each send their own message
    dedup_key: str
    recipient: str  # lower-cased
    message_id: str


class Ledger(Protocol):
    def seen(self, key: SentKey) -> bool: ...

    def mark(self, key: SentKey) -> None: ...


# Tries of the ledger's write after a send: waits of 0.4, 0.8, 1.6, 3.2 s and then 5 s each,
# about 30 s in all (more with each refused connection's own wait) before the task is retried
# and the message, unmarked, is sent again
MARK_TRIES = 10


class PostgresLedger:
    """The `email_sent` table (EMAIL_SENT_DDL); one connection, opened at first use."""

    def __init__(self, dsn: str | None, connect_timeout: int = 5):
        if not dsn:
            raise ValueError("PostgresLedger needs a database URL")
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def seen(self, key: SentKey) -> bool:
        return self._run("SELECT 1 FROM email_sent WHERE sink IN (%s, '') AND dedup_key = %s "
                         "AND recipient = %s", (key.sink, key.dedup_key, key.recipient)) is not None

    def mark(self, key: SentKey) -> None:
        # the message is out: failing here would send it again, so try much harder than a
        # read, through a Postgres restart or failover (about half a minute, MARK_TRIES)
        self._run("INSERT INTO email_sent (sink, dedup_key, recipient, message_id) "
                  "VALUES (%s, %s, %s, %s) ON CONFLICT (sink, dedup_key, recipient) DO NOTHING",
                  (key.sink, key.dedup_key, key.recipient, key.message_id), tries=MARK_TRIES)

    def _run(self, sql: str, params: tuple[str, ...], tries: int = 1) -> Any:
        """One statement; a connection found dead (Postgres restarted, an idle session ended)
        is opened again and the statement run once more, `tries` more times after that."""
        with self._lock:
            failures = 0
            while True:
                reused = self._conn is not None and not (self._conn.closed or self._conn.broken)
                try:
                    if not reused:
                        self._drop()
                        self._conn = psycopg.connect(self.dsn, autocommit=True,
                                                     connect_timeout=self.connect_timeout)
                    assert self._conn is not None
                    cursor = self._conn.execute(sql, params)
                    return cursor.fetchone() if cursor.description else None
                except psycopg.OperationalError as exc:
                    self._drop()
                    if reused:  # an old session that died: a new one says if Postgres is up
                        continue
                    failures += 1
                    if failures >= tries:
                        raise RetryableSinkError(
                            f"email ledger unavailable: {type(exc).__name__}") from exc
                    time.sleep(min(0.2 * 2 ** failures, 5.0))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def message_id(dedup_key: str, recipient: str, sink: str = "") -> str:
    """The same (sink, event, recipient) always gets the same Message-ID, so a resend is
    recognisable; two sinks' different messages for one event get different ones."""
    text = f"{dedup_key}\x00{recipient.lower()}" + (f"\x00{sink}" if sink else "")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"<{digest[:40]}@leadpipe>"


# ---------------------------------------------------------------------------------------------
# SMTP outcomes: codes and short reasons only, never an address or a server's reply text
# (replies often quote the address).

class _Broken(Exception):
    """The connection is gone: later recipients of this event are not tried."""

    def __init__(self, error: SinkError):
        super().__init__(str(error))
        self.error = error


def _by_code(code: int | None, what: str) -> SinkError:
    text = f"smtp {code} {what}" if code is not None else f"smtp {what}"
    if code is not None and 500 <= code < 600:
        return PermanentSinkError(text, status=code)
    return RetryableSinkError(text, status=code)


def classify(exc: BaseException) -> SinkError:
    """One smtplib/socket failure as the sink contract's error."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [reply[0] for reply in exc.recipients.values()]
        return _by_code(codes[0] if codes else None, "refused the recipient")
    if isinstance(exc, smtplib.SMTPAuthenticationError):  # 454: the server's own trouble
        return _by_code(exc.smtp_code, "authentication failed")
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return _by_code(exc.smtp_code, "refused the sender")
    if isinstance(exc, smtplib.SMTPDataError):
        return _by_code(exc.smtp_code, "refused the message")
    if isinstance(exc, smtplib.SMTPConnectError):
        return _by_code(exc.smtp_code, "refused the connection")
    if isinstance(exc, smtplib.SMTPHeloError):
        return _by_code(exc.smtp_code, "refused EHLO")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _by_code(exc.smtp_code, "error")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return RetryableSinkError("smtp server disconnected")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentSinkError("smtp server does not support a required extension "
                                  "(STARTTLS or AUTH)")
    if isinstance(exc, smtplib.SMTPException):
        return PermanentSinkError(f"smtp {type(exc).__name__}")
    if isinstance(exc, OSError):  # refused, unreachable, timed out, TLS handshake
        return RetryableSinkError(f"cannot reach smtp server: {type(exc).__name__}")
    return RetryableSinkError(f"smtp {type(exc).__name__}")


# ---------------------------------------------------------------------------------------------

class EmailSink(Sink):
    """Sends one plain-text message per recipient for each event type it has a template for.

    Sent once per (event, recipient), even when the task runs again: before sending, the
    ledger is asked whether that pair was already sent; after the server accepted the message,
    the pair is marked. The window between the two: a crash after the server accepted and
    before the mark was written means that recipient gets the message once more on the next
    run, with the same Message-ID (derived from the event's dedup key and the recipient), so
    mail clients and servers can recognise and drop or thread it. Two runs of the same event
    at the very same moment could both pass the check: the ledger is a record, not a lock, so
    the delivery layer should not run two deliveries of one event to one sink at once.

    The sink owns its ledger (passed in or made from option `dsn`): close() closes it.

    Recipients are tried independently: one refused recipient does not keep the others from
    getting the message. The error raised afterwards is the first retryable one if any (a
    retry sends only to recipients not yet marked), else the first permanent one.
    """

    name = "email"
    Options = EmailOptions

    def __init__(self, instance: str, options: dict[str, Any], ledger: Ledger | None = None,
                 tls_context: ssl.SSLContext | None = None):
        super().__init__(instance, options)
        try:
            self.templates = resolve_templates(options)
        except ValidationError as exc:
            from sinks.registry import SinkConfigError

            raise SinkConfigError(f"sink {instance!r} (type email): templates: "
                                  f"{exc.messages}") from None
        if ledger is None:
            if not options.get("dsn"):
                from sinks.registry import SinkConfigError

                raise SinkConfigError(f"sink {instance!r} (type email): needs a ledger "
                                      "(pass ledger=, or set option 'dsn')")
            ledger = PostgresLedger(options["dsn"])
        self.ledger = ledger
        # the system's trusted CAs and hostname checks (smtplib's own default checks nothing)
        self.tls_context = tls_context or ssl.create_default_context()

    # -- rendering ------------------------------------------------------------------------

    def render(self, event: Event) -> tuple[str, str] | None:
        """(subject, body) for the event, or None when no template is configured for its type."""
        compiled = self.templates.get(event.event_type)
        if compiled is None:
            return None
        context = view(event)
        try:
            subject = compiled.subject.render(context)
            body = compiled.body.render(context)
        except Exception as exc:  # the template, not the event, is at fault: same every time
            raise PermanentSinkError(f"template for {event.event_type} failed to render: "
                                     f"{type(exc).__name__}") from None
        subject = " ".join(subject.split())  # one header line, however it was written
        # and no RFC 2047 encoded-word of the lead's making: setting the header decodes one,
        # and a CR LF inside it (=0D=0A) would end up raw in the message on some Pythons
        # (CVE-2024-6923), adding headers or a body of the sender's choosing
        subject = subject.replace("=?", "= ?")[:250]
        return subject, body.rstrip("\n") + "\n"

    def build_message(self, event: Event, subject: str, body: str, recipient: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.options["from_"]
        msg["To"] = recipient
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = message_id(event.dedup_key, recipient, self.instance)
        msg["X-Leadpipe-Event-Id"] = event.id
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
        msg.set_content(body, cte="quoted-printable")
        return msg

    # -- delivery -------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        rendered = self.render(event)
        if rendered is None:  # done as far as this sink goes, said so in the log
            log.info("email %s: no template for event type %s; event %s not sent",
                     self.instance, event.event_type, event.id)
            return
        pending = []
        for recipient in self.options["to"]:
            key = SentKey(self.instance, event.dedup_key, recipient.lower(),
                          message_id(event.dedup_key, recipient, self.instance))
            if not self.ledger.seen(key):
                pending.append((recipient, key))
        if not pending:
            return
        errors: list[SinkError] = []
        smtp: smtplib.SMTP | None = None
        options = self.options
        try:
            for n, (recipient, key) in enumerate(pending, 1):
                try:
                    if smtp is None:
                        with Deadline(options["timeout"]) as deadline:
                            smtp = self._open(deadline)
                    message = self.build_message(event, *rendered, recipient)
                    with Deadline(options["timeout"] + options["data_timeout"]) as deadline:
                        self._send(smtp, message, recipient, deadline)
                except _Broken as broken:
                    errors.append(broken.error)
                    break
                except SinkError as exc:
                    errors.append(exc)
                    continue
                self.ledger.mark(key)
                log.info("email %s: event %s sent to recipient %d of %d %s", self.instance,
                         event.id, n, len(pending), key.message_id)
        finally:
            if smtp is not None:  # a server slow to answer QUIT holds nobody past `timeout`
                with Deadline(options["timeout"]) as deadline:
                    if smtp.sock is not None:
                        smtp.sock.settimeout(options["timeout"])
                        deadline.watch(smtp.sock)
                    _quit(smtp)
        if errors:
            error = next((e for e in errors if isinstance(e, RetryableSinkError)), errors[0])
            log.warning("email %s: event %s: %d of %d recipients failed: %s", self.instance,
                        event.id, len(errors), len(pending), error)
            raise error

    def _open(self, deadline: Deadline) -> smtplib.SMTP:
        """A session ready for mail (greeted, TLS, logged in), all of it within `deadline`."""
        options = self.options
        smtp: smtplib.SMTP
        try:  # connecting in the constructor: smtplib then checks TLS against this host name
            if options["security"] == "ssl":
                smtp = _BoundedSMTPS(options["host"], options["port"], _local_hostname(),
                                     timeout=options["timeout"], context=self.tls_context)
            else:
                smtp = _BoundedSMTP(options["host"], options["port"], _local_hostname(),
                                    timeout=options["timeout"])
        except Exception as exc:  # smtplib has closed its socket already
            raise _Broken(_timed(classify(exc), deadline, "connecting")) from None
        try:
            if options["security"] == "starttls":
                smtp.ehlo()
                smtp.starttls(context=self.tls_context)
                smtp.ehlo()
            if options.get("username"):
                smtp.login(options["username"], options["password"])
        except Exception as exc:
            smtp.close()
            raise _Broken(_timed(classify(exc), deadline, "connecting")) from None
        return smtp

    def _send(self, smtp: smtplib.SMTP, msg: EmailMessage, recipient: str,
              deadline: Deadline) -> None:
        """One message, within `deadline`; the server's answer to its end may take up to
        `data_timeout` (a server that took it and answers later gets it again next time)."""
        assert smtp.sock is not None
        deadline.watch(smtp.sock)
        smtp.sock.settimeout(self.options["timeout"] + self.options["data_timeout"])
        try:
            smtp.send_message(msg, to_addrs=[recipient])
        except smtplib.SMTPServerDisconnected as exc:
            raise _Broken(_timed(classify(exc), deadline, "sending")) from None
        except smtplib.SMTPException as exc:  # (a subclass of OSError: caught before it)
            error = classify(exc)
            if error.status == 421 or smtp.sock is None:  # the server is closing the session
                raise _Broken(error) from None
            raise error from None
        except OSError as exc:  # the connection broke mid-way
            raise _Broken(_timed(classify(exc), deadline, "sending")) from None

    def close(self) -> None:
        """Close the ledger's connection; SMTP connections live only within deliver()."""
        closer = getattr(self.ledger, "close", None)
        if callable(closer):
            closer()


class _BoundedSMTP(smtplib.SMTP):
    """smtplib's client, connecting within the Deadline of the block that opens it: the host
    name looked up in what is left of it, the connection shut down when it is up (smtplib's
    own timeout bounds each read, so a server dripping its greeting would hold it for good)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        deadline = current_deadline()
        assert deadline is not None, "opened within a Deadline only"
        try:
            candidates = resolve(host, port, deadline)
        except Unresolved as exc:
            raise TimeoutError(str(exc)) from None
        return connect(candidates, timeout, deadline)


class _BoundedSMTPS(smtplib.SMTP_SSL, _BoundedSMTP):
    """The same for implicit TLS: SMTP_SSL wraps the socket _BoundedSMTP connected."""


def _timed(error: SinkError, deadline: Deadline, doing: str) -> SinkError:
    """The error, said to be the deadline's when it was (the server was too slow)."""
    if deadline.expired:
        return RetryableSinkError(f"smtp server too slow: {doing} took longer than allowed")
    return error


@cache
def _local_hostname() -> str:
    """The name said in EHLO: smtplib looks it up (DNS) on every connection; once is enough."""
    return socket.getfqdn()


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()
