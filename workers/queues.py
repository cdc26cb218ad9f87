"""Which sink queues a worker node consumes: the resume command and the 5-second upkeep."""

from __future__ import annotations

import logging
import threading
from typing import Any

import kombu.exceptions
import redis
from celery import bootsteps
from celery.worker.control import control_command, ok

from config.settings import Settings
from workers.runtime import Runtime, sink_queue, subscriptions_queue

log = logging.getLogger("leadpipe.queues")

INTERVAL = 5.0  # seconds between two reconciliations
RESUME = "leadpipe_resume_queue"  # the remote-control command `operations.resume` broadcasts


class SinkQueues:
    """Keeps one worker node consuming exactly the sink queues it serves that are not paused.

    A node started without --queues serves every configured sink and the subscriptions'
    queue; a node given --queues serves the sink and subscription queues it was given, and
    never others. Pause and resume reach nodes as broadcasts, which a node misses if it is not
    listening at that moment (reconnecting to Redis, starting up); every few seconds this
    compares what the node consumes with what it serves and the pause set in Redis, and sends
    the missing command to this node only, both ways."""

    def __init__(self, worker: Any, runtime: Runtime):
        self.worker = worker
        self.runtime = runtime
        settings = runtime.settings
        self.prefix = f"{settings.namespace}.sink."
        self.subscriptions = subscriptions_queue(settings)
        everything = getattr(getattr(worker.app, "leadpipe", None), "all_queues", False)
        # the node's --queues as Celery selected them before its consumer started (pause and
        # resume change that selection later, so it is read once, here)
        self.given: frozenset[str] | None = None if everything else frozenset(
            worker.app.amqp.queues.consume_from or ())

    def ours(self, queue: str) -> bool:
        """A queue of deliveries: a sink's or the subscriptions'."""
        return queue.startswith(self.prefix) or queue == self.subscriptions

    def served(self) -> set[str]:
        if self.given is None:
            return {sink_queue(self.runtime.settings, sink)
                    for sink in self.runtime.routing.sinks} | {self.subscriptions}
        return {queue for queue in self.given if self.ours(queue)}

    def serves(self, queue: str) -> bool:
        return queue in self.served()

    def wanted(self, paused: set[str]) -> set[str]:
        return {queue for queue in self.served()
                if not (queue.startswith(self.prefix) and queue[len(self.prefix):] in paused)}

    def reconcile(self) -> None:
        task_consumer = getattr(getattr(self.worker, "consumer", None), "task_consumer", None)
        if task_consumer is None:  # the consumer is not (or no longer) connected
            return
        wanted = self.wanted(self.runtime.control.paused())
        consumed = {queue.name for queue in list(task_consumer.queues)}
        me = [self.worker.hostname]
        control = self.worker.app.control
        for queue in sorted(wanted - consumed):
            log.warning("consuming %s: this worker had missed its resume", queue)
            control.add_consumer(queue, exchange=queue, exchange_type="direct",
                                 routing_key=queue, destination=me)
        for queue in sorted(q for q in consumed - wanted if self.ours(q)):
            log.warning("no longer consuming %s: paused, or not served by this worker", queue)
            control.cancel_consumer(queue, destination=me)


@control_command(args=[("queue", str)], signature="<queue>")
def leadpipe_resume_queue(state: Any, queue: str, **_: Any) -> dict[str, str]:
    """Consume a resumed sink's queue, if this node serves it (others ignore the command)."""
    queues = getattr(getattr(state.app, "leadpipe", None), "sink_queues", None)
    if queues is None or not queues.serves(queue):
        return ok(f"not serving {queue}")
    state.consumer.call_soon(state.consumer.add_task_queue, queue, queue, "direct", queue)
    return ok(f"add consumer {queue}")


class QueuesStep(bootsteps.StartStopStep):
    """Reconciles the node's sink queues every INTERVAL seconds, on every worker node."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        settings: Settings = worker.app.leadpipe.settings
        self.queues = SinkQueues(worker, Runtime(settings, worker.app))
        worker.app.leadpipe.sink_queues = self.queues  # what `leadpipe_resume_queue` asks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="leadpipe-queues", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    terminate = stop

    def run(self) -> None:
        delay = 1.0  # soon after start: a node given a paused sink's queue drops it at once
        while not self._stop.wait(delay):
            delay = INTERVAL
            try:
                self.queues.reconcile()
            except (redis.RedisError, OSError, kombu.exceptions.KombuError) as exc:
                log.warning("cannot reconcile sink queues (%s); trying again in %.0fs",
                            type(exc).__name__, INTERVAL)
            except Exception:  # the upkeep must outlive any one failure
                log.exception("reconciling sink queues failed; trying again in %.0fs",
                              INTERVAL)
