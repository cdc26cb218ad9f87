"""The Celery app, made from the same Settings as the rest of Leadpipe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from config.settings import ConfigError, Settings
from workers.broker import tls_for, transport_for
from workers.runtime import Runtime

if TYPE_CHECKING:
    from workers.queues import SinkQueues


class Leadpipe:
    """Hangs off the Celery app: settings, and one Runtime per process, made on first use."""

    def __init__(self, settings: Settings, app: Celery):
        self.settings = settings
        self.app = app
        self._runtime: Runtime | None = None
        # `leadpipe worker` without --queues: serve every sink, including ones resumed later
        self.all_queues = False
        # set in a worker node by its QueuesStep: which sink queues the node serves
        self.sink_queues: SinkQueues | None = None

    def runtime(self, **options: Any) -> Runtime:
        """This process' runtime; `options` (Runtime's) count when it is first made."""
        if self._runtime is None:
            self._runtime = Runtime(self.settings, self.app, **options)
        return self._runtime


def make_celery(settings: Settings | None = None, socket_timeout: float | None = None) -> Celery:
    """Build the Celery app; nothing connects until a worker or a publisher runs.

    `socket_timeout`: for a process that must answer in seconds (the API's operator routes):
    the broker's sockets give up after it and a publish is not retried, so a Redis that stops
    answering fails the publish (left to the relay) instead of holding the caller for good."""
    settings = settings or Settings.from_env()
    if not settings.redis_url:
        raise ConfigError("LEADPIPE_REDIS_URL is not set")
    app = Celery("leadpipe", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport=transport_for(settings.redis_url),
        broker_use_ssl=tls_for(settings.redis_url),
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        task_default_queue=settings.default_queue,
        task_routes={"leadpipe.process_batch": {"queue": settings.ingest_queue}},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    if socket_timeout is not None:
        app.conf.broker_transport_options.update(socket_timeout=socket_timeout,
                                                 socket_connect_timeout=socket_timeout)
        app.conf.update(broker_connection_timeout=socket_timeout, task_publish_retry=False)
    app.leadpipe = Leadpipe(settings, app)  # type: ignore[attr-defined]
    from workers.pump import PumpStep
    from workers.queues import QueuesStep  # also registers the `leadpipe_resume_queue` command

    app.steps["worker"].add(PumpStep)
    app.steps["worker"].add(QueuesStep)
    import workers.tasks  # noqa: F401  (registers the shared tasks with this app)

    return app
