"""Who is an operator: a Bearer admin token, or the signed /ops session cookie plus its CSRF token.

A browser signs in once by posting an admin token to /ops/login; it gets back a cookie
(HttpOnly, SameSite=Strict, Secure on HTTPS) holding, signed and timestamped, a fingerprint of
the token and a random CSRF token. The cookie is refused once it is older than
LEADPIPE_OPS_SESSION_HOURS or once its token is no longer one of LEADPIPE_ADMIN_TOKENS. Every
request that changes something must also send the CSRF token in the X-CSRF-Token header, which
only the dashboard page itself can read (it is written into the page). Signing out records the
session as ended on Redis for as long as any session may be set to last, so a copy of the
cookie is refused from then on by every API process.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

import redis
from flask import Request, Response, current_app, g, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.exceptions import ServiceUnavailable

from config.settings import MAX_HOURS, Settings
from ingest.auth import TokenSet
from ingest.errors import error

log = logging.getLogger("leadpipe.ops")

COOKIE = "leadpipe_ops"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def fingerprint(key: bytes, token: str) -> str:
    """Names an operator in logs and sessions without the token: 12 hex digits of an HMAC of
    it under the session key, so a guess at the token cannot be checked against a log line
    (or a cookie) by whoever does not hold the key."""
    return hmac.new(key, b"operator\n" + token.encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True)
class Operator:
    who: str  # "token:<fingerprint>"
    via: str  # "bearer" or "session"
    csrf: str | None = None  # the session's CSRF token


class Sessions:
    """Issues and checks the /ops session cookie and the operator behind a request."""

    def __init__(self, settings: Settings, client: redis.Redis):
        self.tokens = TokenSet(settings.admin_tokens)
        key = settings.ops_session_key or hmac.new(
            b"leadpipe-ops-session", "\n".join(sorted(settings.admin_tokens)).encode(),
            hashlib.sha256).hexdigest()
        self._key = key.encode()
        self.fingerprints = [self.fingerprint(t) for t in settings.admin_tokens if t]
        self.signer = URLSafeTimedSerializer(key, salt="leadpipe-ops-session")
        self.max_age = settings.ops_session_hours * 3600
        self.always_secure = settings.ops_secure_cookie
        self._ended_prefix = f"{settings.namespace}:ops:signed-out:"
        self._redis = client  # the app's own (no retries: an outage answers at once)

    def fingerprint(self, token: str) -> str:
        """The name logs and sessions give the operator holding `token`."""
        return fingerprint(self._key, token)

    def sign_in(self, token: str | None) -> tuple[str, str] | None:
        """(cookie value, CSRF token) for a valid admin token, else None."""
        if not self.tokens.accepts(token):
            return None
        assert token
        csrf = secrets.token_urlsafe(24)
        return self.signer.dumps({"t": self.fingerprint(token), "c": csrf}), csrf

    def _session(self, cookie: str | None) -> dict[str, str] | None:
        if not cookie:
            return None
        try:
            data = self.signer.loads(cookie, max_age=self.max_age)
        except BadSignature:  # also expired (SignatureExpired is a BadSignature)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            return None
        ok = False
        for known in self.fingerprints:  # still an admin token? (all compared: timing is flat)
            ok |= hmac.compare_digest(known, data["t"])
        return data if ok else None

    def _ended_key(self, data: dict[str, str]) -> str:
        # the session's CSRF token is its random identity; the key holds only a hash of it
        return self._ended_prefix + hashlib.sha256(str(data.get("c")).encode()).hexdigest()[:32]

    def _signed_out(self, data: dict[str, str], method: str) -> bool:
        """Was this session signed out? Unknown (Redis unreachable): a read is let through, a
        change is refused with 503, so an outage neither locks operators out of the dashboard
        nor lets a signed-out cookie change anything."""
        try:
            return bool(self._redis.exists(self._ended_key(data)))
        except redis.RedisError as exc:
            if method in SAFE_METHODS:
                log.warning("ops session not checked for sign-out: %s", type(exc).__name__)
                return False
            raise ServiceUnavailable(
                "Redis is unreachable, so this session cannot be checked; try again shortly, "
                "or send an admin token as Bearer.", retry_after=5) from None

    def sign_out(self, req: Request) -> None:
        """End the request's session for every API process (raises RedisError if it cannot)."""
        data = self._session(req.cookies.get(COOKIE))
        if data is not None:
            # kept as long as any session may last (not this one's length: a longer
            # LEADPIPE_OPS_SESSION_HOURS later would make the copied cookie valid again)
            self._redis.set(self._ended_key(data), b"1", ex=MAX_HOURS * 3600)

    def operator(self, req: Request) -> Operator | None:
        """The operator making this request, or None (no token, or a CSRF check that failed)."""
        header = req.headers.get("Authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        if token is not None:
            return Operator(f"token:{self.fingerprint(token)}", "bearer") \
                if self.tokens.accepts(token) else None
        data = self._session(req.cookies.get(COOKIE))
        if data is None:
            return None
        if req.method not in SAFE_METHODS:
            sent = req.headers.get(CSRF_HEADER) or req.form.get("csrf") or ""
            if not hmac.compare_digest(sent.encode(), str(data.get("c", "")).encode()):
                return None
        if self._signed_out(data, req.method):
            return None
        return Operator(f"token:{data['t']}", "session", data.get("c"))

    def set_cookie(self, response: Response, value: str, secure: bool) -> None:
        response.set_cookie(COOKIE, value, max_age=self.max_age, path="/", httponly=True,
                            samesite="Strict", secure=secure or self.always_secure)

    def clear_cookie(self, response: Response, secure: bool) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                               secure=secure or self.always_secure)


def sessions() -> Sessions:
    """This app's Sessions, made on first use from its settings."""
    found = current_app.extensions.get("leadpipe.sessions")
    if found is None:
        ext = current_app.extensions["leadpipe"]
        found = Sessions(ext.settings, ext.stream.client)
        current_app.extensions["leadpipe.sessions"] = found
    return found


def current_operator() -> Operator | None:
    """The request's operator, checked once per request."""
    if "leadpipe_operator" not in g:
        g.leadpipe_operator = sessions().operator(request)
    return g.leadpipe_operator


def require_operator() -> Response | None:
    """A blueprint's before_request: 401 in RD's error shape unless an operator asks."""
    if current_operator() is not None:
        return None
    response = error(401, "UNAUTHORIZED", "Invalid token.")
    response.headers["WWW-Authenticate"] = 'Bearer realm="leadpipe"'
    return response
