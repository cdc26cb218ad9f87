"""Who is an operator: a Bearer admin token, or the signed /ops session cookie plus its CSRF token.

A browser signs in once by posting an admin token to /ops/login; it gets back a cookie
(HttpOnly, SameSite=Strict, Secure on HTTPS) holding, signed and timestamped, a fingerprint of
the token and a random CSRF token. The cookie is refused once it is older than
LEADPIPE_OPS_SESSION_HOURS or once its token is no longer one of LEADPIPE_ADMIN_TOKENS. Every
request that changes something must also send the CSRF token in the X-CSRF-Token header, which
only the dashboard page itself can read (it is written into the page).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from flask import Request, Response, current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from config.settings import Settings
from ingest.auth import TokenSet
from ingest.errors import error

COOKIE = "leadpipe_ops"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def fingerprint(token: str) -> str:
    """Names an operator in logs and sessions without the token: a short hash of it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Operator:
    who: str  # "token:<fingerprint>"
    via: str  # "bearer" or "session"
    csrf: str | None = None  # the session's CSRF token


class Sessions:
    """Issues and checks the /ops session cookie and the operator behind a request."""

    def __init__(self, settings: Settings):
        self.tokens = TokenSet(settings.admin_tokens)
        self.fingerprints = [fingerprint(t) for t in settings.admin_tokens if t]
        key = settings.ops_session_key or hmac.new(
            b"leadpipe-ops-session", "\n".join(sorted(settings.admin_tokens)).encode(),
            hashlib.sha256).hexdigest()
        self.signer = URLSafeTimedSerializer(key, salt="leadpipe-ops-session")
        self.max_age = settings.ops_session_hours * 3600
        self.always_secure = settings.ops_secure_cookie

    def sign_in(self, token: str | None) -> tuple[str, str] | None:
        """(cookie value, CSRF token) for a valid admin token, else None."""
        if not self.tokens.accepts(token):
            return None
        assert token
        csrf = secrets.token_urlsafe(24)
        return self.signer.dumps({"t": fingerprint(token), "c": csrf}), csrf

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

    def operator(self, req: Request) -> Operator | None:
        """The operator making this request, or None (no token, or a CSRF check that failed)."""
        header = req.headers.get("Authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        if token is not None:
            return Operator(f"token:{fingerprint(token)}", "bearer") \
                if self.tokens.accepts(token) else None
        data = self._session(req.cookies.get(COOKIE))
        if data is None:
            return None
        if req.method not in SAFE_METHODS:
            sent = req.headers.get(CSRF_HEADER) or req.form.get("csrf") or ""
            if not hmac.compare_digest(sent.encode(), str(data.get("c", "")).encode()):
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
        found = Sessions(current_app.extensions["leadpipe"].settings)
        current_app.extensions["leadpipe.sessions"] = found
    return found


def current_operator() -> Operator | None:
    return sessions().operator(request)


def require_operator() -> Response | None:
    """A blueprint's before_request: 401 in RD's error shape unless an operator asks."""
    if current_operator() is not None:
        return None
    response = error(401, "UNAUTHORIZED", "Invalid token.")
    response.headers["WWW-Authenticate"] = 'Bearer realm="leadpipe"'
    return response
