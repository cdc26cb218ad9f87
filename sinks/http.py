"""What the HTTP sinks share: option fields, the JSON body, one request and its outcome mapping
(the client itself, with its deadline and pinning, is sinks.transport)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import requests
from marshmallow import ValidationError, fields
from marshmallow.validate import Range

from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.transport import Deadline

# Answers worth another try; every other non-2xx is final (RFC 9110: 408, 429, 5xx).
RETRYABLE_STATUSES = frozenset({408, 429})
# Answers whose Retry-After is honoured (RFC 9110 section 10.2.3; RFC 6585 for 429).
RETRY_AFTER_STATUSES = frozenset({429, 503})
# A Retry-After past this is taken as this: a destination cannot park a delivery for years
# (nor a Celery countdown past its calendar); the sink's retry rounds go on from there.
MAX_RETRY_AFTER_SECONDS = 3600.0
# Of an answer's body, at most this much is read (nothing of it is used; reading a small one
# keeps the connection for the next request), so a destination cannot fill a worker's memory.
MAX_ANSWER_BYTES = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 5.1)
# both taken whole (fullmatch: "$" would let a last "\n" in)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # visible ASCII, space and tab: no CR/LF


# ---------------------------------------------------------------------------------------------
# Option fields


def http_url(*, allow_query: bool = True, **kwargs: Any) -> fields.Url:
    """An absolute http(s) URL option, with no credentials in it (they would end up in logs)."""

    def check(value: str) -> None:
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValidationError("Must not carry credentials; use the auth options instead.")
        if not allow_query and (parts.query or parts.fragment):
            raise ValidationError("Must not have a query string or fragment.")

    return fields.Url(schemes={"http", "https"}, require_tld=False, validate=check, **kwargs)


def timeout_field(default: float = 5.0) -> fields.Float:
    """Seconds one request may take in all: connecting, sending and reading the whole answer."""
    return fields.Float(load_default=default,
                        validate=Range(min=0, min_inclusive=False, max=300))


def header_name(value: str) -> None:
    """Validator: an HTTP field name."""
    if not _TOKEN.fullmatch(value):
        raise ValidationError("Not a valid HTTP header name.")


def free_header(own: frozenset[str]):  # type: ignore[no-untyped-def]
    """Validator factory: a header name that is valid and not one the sink sets itself."""

    def check(value: str) -> None:
        header_name(value)
        if value.lower() in own:
            raise ValidationError(f"{value!r} is a header the sink sets itself.")

    return check


def header_value(value: str) -> None:
    """Validator: a header value requests can send (ASCII, no line breaks). Never echoes it."""
    if not _HEADER_VALUE.fullmatch(value):
        raise ValidationError("Must be printable ASCII without line breaks.")


# ---------------------------------------------------------------------------------------------
# Bodies and headers


def json_body(data: Any) -> bytes:
    """The deterministic JSON encoding every HTTP sink sends.

    Python's `json.dumps` with separators `(",", ":")`, `ensure_ascii=False` (UTF-8 text, not
    \\u escapes) and keys in the order they were built; NaN and Infinity are refused. Text that
    UTF-8 cannot encode (a lone surrogate from a body RD sent) falls back to `ensure_ascii=True`.
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"),
                          allow_nan=False).encode("ascii")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date) as seconds from now; None if unusable.

    A date in the past means "now" (0); anything past MAX_RETRY_AFTER_SECONDS is that.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(MAX_RETRY_AFTER_SECONDS, float(int(value)))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, source zone unknown"
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, when.timestamp() - now))


_SECONDS = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() takes "²" too


# ---------------------------------------------------------------------------------------------
# One request, one outcome


def send(session: requests.Session, method: str, url: str, *, body: bytes,
         headers: Mapping[str, str], timeout: float, label: str,
         retry_any_status: bool = False, deadline: Deadline | None = None) -> requests.Response:
    """Make exactly one request; return the answer if it is 2xx, else raise the sink error.

    - 2xx: returned.
    - 408, 429, 5xx, a connection that fails or breaks, a timeout: RetryableSinkError with the
      status (None without an answer) and, for 429 and 503, the Retry-After in seconds.
    - anything else (other 4xx, and 3xx: redirects are not followed, configure the final URL):
      PermanentSinkError with the status; RetryableSinkError too with `retry_any_status` (RD's
      rule for the URLs it calls: anything but a 2xx is a failure to try again).

    `timeout` bounds the whole request (a `Deadline`), not only each read; the answer counts once
    its status line and headers are in: its body (at most MAX_ANSWER_BYTES read) only has until
    the same deadline, and a body that is late or broken changes nothing. With `deadline` (one
    the caller entered before `timeout` began to run out, e.g. for a name lookup), the request
    has only what is left of it.

    Messages hold `label`, the status and a short reason only: never the URL (an entity key may be
    an e-mail), the body or what the destination answered, so they are safe to log.
    """
    with contextlib.ExitStack() as stack:
        if deadline is None:
            deadline = stack.enter_context(Deadline(timeout))
        late = f"{label}: no answer within {timeout:g} s"
        left = deadline.remaining()
        if left <= 0:
            raise RetryableSinkError(late)
        try:
            response = session.request(method, url, data=body, headers=dict(headers),
                                       timeout=left, allow_redirects=False, stream=True)
        except requests.RequestException as exc:
            if deadline.expired or isinstance(exc, requests.Timeout):
                raise RetryableSinkError(late) from None
            if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError
                          | requests.exceptions.ContentDecodingError):
                raise RetryableSinkError(
                    f"{label}: connection failed ({_cause(exc)})") from None
            # unexpected: keep the event, try again later
            raise RetryableSinkError(
                f"{label}: request failed ({type(exc).__name__})") from None
        _drain(response)
    status = response.status_code
    if 200 <= status < 300:
        return response
    message = f"{label}: HTTP {status} {_phrase(status)}".rstrip()
    if retry_any_status or status in RETRYABLE_STATUSES or 500 <= status < 600:
        delay = (retry_after(response.headers.get("Retry-After"))
                 if status in RETRY_AFTER_STATUSES else None)
        raise RetryableSinkError(message, status=status, retry_after=delay)
    raise PermanentSinkError(message, status=status)


def _drain(response: requests.Response) -> None:
    """Read what the answer's body holds, up to MAX_ANSWER_BYTES, so the connection can serve
    the next request; a body that breaks or outlasts the deadline only costs the connection."""
    try:
        read = 0
        for chunk in response.iter_content(16 * 1024):
            read += len(chunk)
            if read >= MAX_ANSWER_BYTES:
                break  # the rest is never read: the connection is dropped, not kept
    except (requests.RequestException, OSError):
        pass
    finally:
        response.close()


def _phrase(status: int) -> str:
    """The standard reason phrase: the destination's own could carry anything."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _cause(exc: BaseException) -> str:
    """The operating system's reason behind a requests error ("Connection refused"), else the
    exception class; never its text, which holds the URL."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        reason = getattr(current, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        current = nxt or current.__cause__ or current.__context__
    return type(exc).__name__
