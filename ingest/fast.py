"""The common case of POST /webhooks/rdstation answered in plain WSGI; Flask answers every other."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from werkzeug.http import parse_options_header

from ingest.views import (
    KNOWN_HINTS,
    READ_ERRORS,
    body_shape,
    is_json,
    store,
    unavailable,
    unreadable,
)

if TYPE_CHECKING:
    from flask import Flask

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
PATH = "/webhooks/rdstation"
_HEADERS_OF = {"CONTENT_TYPE", "CONTENT_LENGTH"}  # the only headers WSGI keeps without HTTP_


def environ_key(header: str) -> str:
    """Where WSGI puts a request header (as werkzeug's EnvironHeaders looks it up)."""
    key = header.upper().replace("-", "_")
    return key if key in _HEADERS_OF else "HTTP_" + key


def fast_ingest(app: Flask) -> WSGIApp:
    """Wrap `app.wsgi_app`: a request that will surely be accepted is stored and answered 202
    (or 503) here, without building Flask's request and response objects.

    Anything else — another route or method, no or a wrong token, a chunked, empty, oversized
    or non-JSON body, an unknown event_type hint, JSON that is not an object — goes to the
    Flask view unchanged (a body already read is handed on in memory), so every answer but
    the 202 comes from one place. Each check below decides as the Flask view does (werkzeug's
    query and Content-Type parsing); when in doubt the request goes to Flask.
    """
    flask_app: WSGIApp = app.wsgi_app
    ext = app.extensions["leadpipe"]
    settings = ext.settings
    accepts = ext.tokens.accepts
    limit = settings.max_body_bytes
    token_key = environ_key(settings.ingest_token_header)
    log = app.logger  # the logger and handler the Flask view logs to
    json_types: dict[str, bool] = {}  # Content-Type header -> JSON to werkzeug; a few distinct

    def json_type(content_type: str) -> bool:
        known = json_types.get(content_type)
        if known is None:
            known = is_json(parse_options_header(content_type)[0].lower())
            if len(json_types) < 64:  # a client sending random types gains nothing
                json_types[content_type] = known
        return known

    def query(environ: dict[str, Any]) -> tuple[str | None, str | None] | None:
        """(token, event_type) as request.args.get() gives them; None: leave it to Flask."""
        qs = environ.get("QUERY_STRING", "")
        if not qs.isascii():
            return None
        token = hint = None
        seen_token = seen_hint = False
        for name, value in parse_qsl(qs, keep_blank_values=True, errors="werkzeug.url_quote"):
            if name == "token" and not seen_token:  # the first value wins, as in a MultiDict
                token, seen_token = value, True
            elif name == "event_type" and not seen_hint:
                hint, seen_hint = value, True
        return token, hint

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return flask_app(environ, start_response)
        length = environ.get("CONTENT_LENGTH", "")
        if (not length.isascii() or not length.isdigit() or not 0 < int(length) <= limit
                or "HTTP_TRANSFER_ENCODING" in environ
                or not json_type(environ.get("CONTENT_TYPE", ""))):
            return flask_app(environ, start_response)
        args = query(environ)
        if args is None:
            return flask_app(environ, start_response)
        token, hint = args
        if not accepts(token or environ.get(token_key)) or (
                hint is not None and hint not in KNOWN_HINTS):
            return flask_app(environ, start_response)
        size = int(length)
        try:
            body = environ["wsgi.input"].read(size)
        except READ_ERRORS as exc:  # a connection the server saw break: as the view answers
            return unreadable(log, exc)(environ, start_response)
        if len(body) != size:  # the client closed early
            return unreadable(log, None)(environ, start_response)
        if body_shape(body) != "object":
            return flask_app({**environ, "wsgi.input": io.BytesIO(body)}, start_response)
        event_id = store(ext, body, hint, log)
        if event_id is None:
            return unavailable(settings)(environ, start_response)
        answer = b'{"id":"%s"}' % event_id.encode()
        start_response("202 ACCEPTED", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(answer)))])
        return [answer]

    return wsgi
