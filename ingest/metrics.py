"""GET /metrics in Prometheus text format: the shared counters plus gauges read at scrape time."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric

from config.settings import Settings
from ingest.auth import TokenSet
from ingest.errors import error
from ingest.queue import make_redis
from workers.metrics import Recorder

if TYPE_CHECKING:  # the runtime and its queries load on the first scrape, not with the API
    from workers.status import PipelineState

bp = Blueprint("metrics", __name__)
INGEST_PATH = "/webhooks/rdstation"
CIRCUIT_STATES = ("closed", "open", "half-open")


class Access:
    """Who may scrape: a Bearer token (metrics or admin tokens), or an allowed client address."""

    def __init__(self, settings: Settings):
        self.tokens = TokenSet((*settings.metrics_tokens, *settings.admin_tokens))
        self.networks = [ipaddress.ip_network(n, strict=False) for n in settings.metrics_allow]

    def allows(self, remote_addr: str | None, authorization: str) -> bool:
        token = authorization[7:] if authorization.lower().startswith("bearer ") else None
        if self.tokens.accepts(token):
            return True
        try:
            address = ipaddress.ip_address(remote_addr or "")
        except ValueError:
            return False
        # a dual-stack listener (--host ::) sees IPv4 clients as ::ffff:a.b.c.d: either form
        # may be the one allowed
        forms = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        return any(form in network for network in self.networks for form in forms)


def install(app: Flask, settings: Settings) -> None:
    """Add /metrics and count the ingest endpoint's answers.

    Call it last in create_app: the counting wraps `app.wsgi_app` as it is then, so answers
    given by any other wrapper (a fast path) inside it are counted too.
    """
    assert settings.redis_url
    recorder = Recorder(make_redis(settings.redis_url, timeout=settings.redis_timeout_seconds),
                        settings.namespace)
    app.extensions["leadpipe.metrics"] = (recorder, Access(settings))
    app.register_blueprint(bp)
    app.wsgi_app = count_ingest(app.wsgi_app, recorder)  # type: ignore[method-assign]


def count_ingest(wsgi_app: Callable[..., Iterable[bytes]],
                 recorder: Recorder) -> Callable[..., Iterable[bytes]]:
    """WSGI middleware: count each answer of the ingest endpoint by status; the rest pass by."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != INGEST_PATH:
            return wsgi_app(environ, start_response)

        def counting(status: str, headers: list, exc_info: Any = None) -> Any:
            recorder.inc("leadpipe_ingest_requests", status=status[:3])
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, counting)

    return app


@bp.get("/metrics")
def metrics() -> Response:
    recorder, access = current_app.extensions["leadpipe.metrics"]
    if not access.allows(request.remote_addr, request.headers.get("Authorization", "")):
        response = error(401, "UNAUTHORIZED", "Invalid token.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="leadpipe"'
        return response
    from ingest.admin import _runtime as workers_runtime  # the same lazily built runtime
    from workers.status import collect

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(recorder, collect(workers_runtime())))  # type: ignore[arg-type]
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Scrape:
    """One scrape's metrics: the counters from Redis, then the pipeline's gauges."""

    def __init__(self, recorder: Recorder, state: PipelineState):
        self.recorder = recorder
        self.state = state

    def collect(self) -> Iterator[Metric]:
        if self.state.redis_up:
            yield from self.recorder.families()
        yield from gauges(self.state)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = (),
           rows: Iterable[tuple[list[str], float]] = ()) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def gauges(state: PipelineState) -> Iterator[Metric]:
    """The state at scrape time; a source that did not answer leaves its gauges out."""
    yield _gauge("leadpipe_source_up", "1 when the scrape could read this source.", ("source",),
                 [(["redis"], state.redis_up), (["postgres"], state.postgres_up)])
    sinks = sorted(state.sinks.values(), key=lambda s: s.sink)
    if state.redis_up:
        yield _gauge("leadpipe_ingest_queue_depth", "Entries on the ingest stream (not yet "
                     "stored in Postgres).", rows=[([], state.ingest_depth)])
        yield _gauge("leadpipe_ingest_queue_unread", "Entries on the ingest stream no worker "
                     "has read yet.", rows=[([], state.ingest_unread)])
        yield _gauge("leadpipe_ingest_queue_oldest_age_seconds", "Age of the oldest entry on "
                     "the ingest stream (0 when empty).", rows=[([], state.ingest_oldest_seconds)])
        yield _gauge("leadpipe_sink_paused", "1 while the sink is paused.", ("sink",),
                     [([s.sink], s.paused) for s in sinks])
        yield _gauge("leadpipe_sink_circuit", "1 on the sink's circuit breaker state.",
                     ("sink", "state"),
                     [([s.sink, c], s.circuit == c) for s in sinks for c in CIRCUIT_STATES])
    if state.postgres_up:
        yield _gauge("leadpipe_sink_queue_depth", "Deliveries waiting for the sink (pending).",
                     ("sink",), [([s.sink], s.pending) for s in sinks])
        yield _gauge("leadpipe_sink_queue_oldest_age_seconds", "Age of the sink's oldest "
                     "waiting delivery (0 when none).", ("sink",),
                     [([s.sink], s.oldest_pending_seconds) for s in sinks])
        yield _gauge("leadpipe_sink_oldest_undelivered_lead_age_seconds", "Since the oldest "
                     "lead event still waiting for the sink arrived (speed to lead; 0 when "
                     "none).", ("sink",), [([s.sink], s.oldest_lead_seconds) for s in sinks])
        yield _gauge("leadpipe_dead_letters", "Dead letters not replayed.", ("sink",),
                     [([s.sink], s.dead) for s in sinks])
        yield _gauge("leadpipe_quarantined", "Bodies in quarantine.",
                     rows=[([], state.quarantined)])
        yield _gauge("leadpipe_erasures_unfinished", "Erasures recorded whose rows are not "
                     "changed yet (running, or failed: run them again).",
                     rows=[([], state.unfinished_erasures)])
