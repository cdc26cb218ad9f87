"""RD Station-shaped JSON errors, used for every error answer Leadpipe gives."""

from __future__ import annotations

import traceback

import orjson
import psycopg
from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

# error_type per status for errors raised by Werkzeug itself (unknown URL, wrong method...).
_TYPES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "RESOURCE_NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID",
    429: "TOO_MANY_REQUESTS",
    503: "SERVICE_UNAVAILABLE",
}


def error(status: int, error_type: str, message: str, headers: dict | None = None) -> Response:
    body = orjson.dumps({"errors": {"error_type": error_type, "error_message": message}})
    return Response(body, status=status, mimetype="application/json", headers=headers)


# What a query meets on a database not yet migrated to this version (a deploy that started
# before `leadpipe migrate` ran): the APIs answer not_migrated(), a 503 to retry, never a 500.
NOT_MIGRATED = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)


def not_migrated(exc: Exception) -> Response:
    current_app.logger.warning("database not migrated: %s", type(exc).__name__)
    return error(503, "SERVICE_UNAVAILABLE",
                 "The database is not migrated to this version: run `leadpipe migrate`.",
                 headers={"Retry-After": "5"})


def frames(exc: BaseException) -> str:
    """The traceback of an exception and of those it was raised from, without their messages:
    an exception's text may quote what was sent (a lead's name, a body line)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}:\n"
                     + "".join(traceback.format_tb(current.__traceback__)))
        current = current.__cause__ or current.__context__
    return "\n".join(parts).rstrip()


def register(app: Flask) -> None:
    """Turn every HTTP error and any unexpected exception into an RD-shaped JSON answer."""

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error(status, _TYPES.get(status, "ERROR"), message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.error("unexpected error: %s\n%s", type(exc).__name__, frames(exc))
        if request.path == "/webhooks/rdstation":
            return error(500, "INTERNAL_ERROR", "Internal error; the event was not accepted.")
        return error(500, "INTERNAL_ERROR", "Internal error.")
