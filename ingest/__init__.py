"""The thin HTTP edge: accepts RD Station webhooks and puts their raw bodies on Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask, Response, request

from config.settings import ConfigError, Settings
from ingest import errors
from ingest.auth import TokenSet
from ingest.queue import IngestStream, make_redis


@dataclass
class Ingest:
    """What the request handlers need, built once per app."""

    settings: Settings
    tokens: TokenSet
    stream: IngestStream
    runtime: Any = None  # the workers' runtime, made by the operator API on first use
    spool: Any = None  # ingest.spool.Spool when LEADPIPE_SPOOL_DIR is set


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app from settings (read from the environment when not given)."""
    settings = settings or Settings.from_env()
    if not settings.redis_url:
        raise ConfigError("LEADPIPE_REDIS_URL is not set")
    if not settings.ingest_tokens:
        raise ConfigError("LEADPIPE_INGEST_TOKENS is not set: the endpoint would accept no one")
    app = Flask(__name__)
    client = make_redis(settings.redis_url, timeout=settings.redis_timeout_seconds, retries=0)
    stream = IngestStream(client, settings.stream_key,
                          writer="group" if settings.group_commit else "thread",
                          commit_timeout=settings.redis_timeout_seconds + 1)
    spool = None
    if settings.spool_dir:
        from ingest.spool import Spool

        spool = Spool(settings.spool_dir, make_redis(settings.redis_url, timeout=5, retries=0),
                      settings.stream_key)
        if spool.files():  # left by an earlier life of this server: hand them over
            spool.start()
    app.extensions["leadpipe"] = Ingest(settings, TokenSet(settings.ingest_tokens), stream,
                                        spool=spool)
    from ingest.admin import bp as admin
    from ingest.dashboard import bp as dashboard
    from ingest.openapi import bp as openapi
    from ingest.ops import bp as ops
    from ingest.subscriptions import bp as subscriptions
    from ingest.views import bp

    app.register_blueprint(bp)
    app.register_blueprint(admin)
    app.register_blueprint(subscriptions)
    app.register_blueprint(openapi)
    app.register_blueprint(dashboard)
    app.register_blueprint(ops)
    errors.register(app)
    from ingest import metrics

    @app.get("/healthz")
    def healthz() -> Response:
        """The process is up (for liveness probes); touches nothing."""
        return Response(b'{"status":"ok"}', mimetype="application/json")

    from ingest.health import Readiness, verdict

    readiness = Readiness(settings, client)

    @app.get("/readyz")
    def readyz() -> Response:
        """Can this node take webhooks now (for load balancers)? `?full=1`: and is everything
        else up too (Postgres, migrations current), for deploy scripts."""
        checks = readiness.checks()
        status, ready = verdict(checks, spool is not None, full=request.args.get("full") == "1")
        body = orjson.dumps({"status": status,
                             "checks": {k: "ok" if v else "failing" for k, v in checks.items()}})
        return Response(body, status=200 if ready else 503, mimetype="application/json")

    if settings.ingest_fast_path:
        from ingest.fast import fast_ingest

        app.wsgi_app = fast_ingest(app)  # type: ignore[method-assign]
    metrics.install(app, settings)  # last: it counts what every layer of wsgi_app answers
    return app
