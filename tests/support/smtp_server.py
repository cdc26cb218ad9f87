"""A real SMTP server on 127.0.0.1 (aiosmtpd) that records messages and answers from a script."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support.certs import self_signed_files

HOST = "127.0.0.1"
STAGES = ("MAIL", "RCPT", "DATA")
_TEXTS = {
    "MAIL": "sender refused",
    "RCPT": "<{address}>: recipient refused",  # real servers quote the address back
    "DATA": "message refused",
}


@dataclass(frozen=True)
class Received:
    """One accepted message: the envelope, the parsed message, when it arrived (time.time()).
    `raw` is the DATA as it came over the wire (CRLF line ends)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    raw: bytes
    at: float
    authenticated_as: str | None  # the AUTH login of the session, if it logged in


@dataclass
class _Failure:
    stage: str
    code: int
    text: str | None
    left: int


class _Handler:
    """aiosmtpd hooks: scripted failures first, then the ordinary answers."""

    def __init__(self, server: SmtpServer):
        self.server = server

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.server.users and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self.server._take("MAIL", address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.server._take("RCPT", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.server._take("DATA", "")
        if reply:
            return reply
        if self.server.data_delay:  # takes the message, answers late (a slow relay)
            await asyncio.sleep(self.server.data_delay)
        raw = bytes(envelope.content)
        login = getattr(session, "auth_data", None)
        self.server._record(Received(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            # as a mail client shows it: line ends are LF once off the wire
            message=email.message_from_bytes(  # type: ignore[arg-type]
                raw.replace(b"\r\n", b"\n"), policy=email.policy.default),
            raw=raw,
            at=time.time(),
            authenticated_as=login.login.decode() if isinstance(login, LoginPassword) else None,
        ))
        return "250 2.0.0 Message accepted"


class _Controller(Controller):
    """aiosmtpd's threaded controller, bound to port 0 (the OS picks a free port, no race)."""

    def __init__(self, owner: SmtpServer, handler: _Handler, **kwargs: Any):
        super().__init__(handler, hostname=HOST, port=0, **kwargs)
        self.owner = owner

    def factory(self):  # type: ignore[no-untyped-def]
        self.owner._connected()
        return super().factory()

    def _trigger_server(self) -> None:
        # start() connects once to make aiosmtpd build its SMTP object; by now the listening
        # socket is bound, so learn the port the OS chose before that connection is made
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """A local SMTP server for one test.

    `users` ({login: password}) turns on AUTH (PLAIN and LOGIN) and refuses MAIL FROM from a
    session that has not logged in. `starttls` (a server SSLContext, see `self_signed`) offers
    STARTTLS and requires it before MAIL. `fail_next(code, count, stage)` makes the server answer
    `code` to the next `count` MAIL, RCPT or DATA commands instead of accepting them.
    `data_delay` (seconds) holds the answer to each message's end that long.
    """

    def __init__(self, users: Mapping[str, str] | None = None,
                 starttls: ssl.SSLContext | None = None):
        self.users = dict(users or {})
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._failures: deque[_Failure] = deque()
        self._connections = 0
        self.data_delay = 0.0
        self._kwargs: dict[str, Any] = {"server_hostname": "smtp.test", "ready_timeout": 10}
        if self.users:
            self._kwargs["authenticator"] = self._authenticate
            self._kwargs["auth_require_tls"] = starttls is not None
        if starttls is not None:
            self._kwargs["tls_context"] = starttls
            self._kwargs["require_starttls"] = True
        self._controller: _Controller | None = None
        self.host = HOST
        self.port = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> SmtpServer:
        """Listen on a free port (then in `port`). The controller, and its event loop, exist
        only between start() and stop(), so a server never started leaves nothing open."""
        assert self._controller is None, "already started"
        controller = _Controller(self, _Handler(self), **self._kwargs)
        try:
            controller.start()
        except BaseException:
            controller.stop(no_assert=True)
            if not controller.loop.is_closed():  # it failed before its thread took the loop
                controller.loop.close()
            raise
        self._controller = controller
        self.port = controller.port
        with self._lock:
            self._connections = 0  # the controller's own start-up probe is not a client
        return self

    def stop(self) -> None:
        """Stop listening, end open sessions, close the event loop; the port stays in `port`."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests look at ------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Client connections since start()."""
        with self._lock:
            return self._connections

    def fail_next(self, code: int, count: int = 1, stage: str = "DATA",
                  text: str | None = None) -> None:
        """Answer `code` (e.g. 451, 550) to the next `count` commands of `stage`."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        with self._lock:
            self._failures.append(_Failure(stage, code, text, count))

    # -- called from the server's thread ---------------------------------------------------

    def _take(self, stage: str, address: str) -> str | None:
        with self._lock:
            for failure in self._failures:
                if failure.stage == stage and failure.left > 0:
                    failure.left -= 1
                    if failure.left == 0:
                        self._failures.remove(failure)
                    text = failure.text if failure.text is not None else _TEXTS[stage]
                    return f"{failure.code} {text.format(address=address)}"
        return None

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and self.users.get(auth_data.login.decode()) == auth_data.password.decode())
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def self_signed(folder: Path, host: str = HOST) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context that trusts it) for a fresh self-signed certificate of
    `host`; raises FileNotFoundError when openssl is missing."""
    cert, key = self_signed_files(folder, host, name="smtp")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client
