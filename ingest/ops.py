"""The /ops pipeline dashboard: its sign-in, the page and its two static files (no build step)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Response, redirect, render_template, request, send_from_directory

from ingest.errors import error
from ingest.session import current_operator, sessions

log = logging.getLogger("leadpipe.ops")
ASSETS = Path(__file__).parent / "assets"
STATIC = frozenset({"ops.js", "ops.css"})
bp = Blueprint("ops", __name__, url_prefix="/ops", template_folder="assets")


def _secure(response: Response, nonce: str | None = None) -> Response:
    """Headers for every /ops answer: no framing, no caching, scripts and styles only our own."""
    style = f"'self' 'nonce-{nonce}'" if nonce else "'self'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
        f"style-src {style}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _wants_html() -> bool:
    accept = request.accept_mimetypes
    return accept.accept_html and accept.quality("text/html") >= accept.quality("application/json")


def _unauthorized(message: str = "") -> Response:
    """401: the sign-in form for a browser, RD's JSON error for anything else."""
    if not _wants_html():
        response = error(401, "UNAUTHORIZED", "Invalid token.")
    else:
        nonce = secrets.token_urlsafe(16)
        response = _secure(Response(render_template("login.html", nonce=nonce, message=message),
                                    status=401, mimetype="text/html"), nonce)
    response.headers["WWW-Authenticate"] = 'Bearer realm="leadpipe"'
    return response


@bp.get("")
def page() -> Response:
    operator = current_operator()
    if operator is None:
        return _unauthorized()
    html = render_template("ops.html", csrf=operator.csrf or "")
    return _secure(Response(html, mimetype="text/html"))


@bp.get("/assets/<name>")
def asset(name: str) -> Response:
    if current_operator() is None:
        return _unauthorized()
    if name not in STATIC:
        return error(404, "RESOURCE_NOT_FOUND", "No such file.")
    return _secure(send_from_directory(ASSETS, name, max_age=0))


def _same_origin() -> bool:
    """A form posted from our own page (or by a client that is not a browser)."""
    site = request.headers.get("Sec-Fetch-Site")  # what browsers say of who made the request
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[" and the like: no origin of ours
        return False
    return netloc == request.host


@bp.post("/login")
def login() -> Response:
    """Trade an admin token (form field `token`) for the session cookie; the token is not kept."""
    if not _same_origin():
        return _unauthorized("Sign in from this server's own page.")
    signed = sessions().sign_in(request.form.get("token"))
    if signed is None:
        log.warning("ops sign-in refused")
        return _unauthorized("That token is not one of LEADPIPE_ADMIN_TOKENS.")
    cookie, _ = signed
    response = _secure(redirect("/ops", code=303))
    sessions().set_cookie(response, cookie, secure=request.is_secure)
    who = sessions().fingerprint(request.form["token"])
    log.info("ops sign-in", extra={"operator": f"token:{who}"})
    return response


@bp.post("/logout")
def logout() -> Response:
    """End the session for good and drop its cookie (needs the CSRF token, like every change)."""
    operator = current_operator()
    if operator is None:
        return _unauthorized()
    if operator.via == "session":
        try:
            sessions().sign_out(request)
        except redis.RedisError:  # the cookie would still work elsewhere: say so, keep it
            return error(503, "SERVICE_UNAVAILABLE",
                         "Redis is unreachable, so the session could not be ended; try again.",
                         headers={"Retry-After": "5"})
    response = _secure(Response(status=204))
    sessions().clear_cookie(response, secure=request.is_secure)
    return response
