"""Per-sink state on a real Redis: the half-open circuit's one probe at a time."""

from __future__ import annotations

import time
import uuid

from workers.control import SinkControl


def test_the_probe_is_one_task_s_and_that_task_may_ask_again(redis_client):
    """Once the cooldown has passed, one caller takes the probe; it may ask again and go on
    (a send that told nothing about the sink), every other caller waits; a success closes."""
    control = SinkControl(redis_client, "c" + uuid.uuid4().hex[:8])
    assert control.circuit_wait("crm", 0.2, "task-a") == 0  # closed
    assert control.circuit_failure("crm", 2, 0.2) is False
    assert control.circuit_failure("crm", 2, 0.2) is True
    assert control.circuit_wait("crm", 0.2, "task-a") > 0  # open
    time.sleep(0.25)
    assert control.circuit_state("crm") == "half-open"
    assert control.circuit_wait("crm", 5, "task-a") == 0  # the probe is task-a's
    assert control.circuit_wait("crm", 5, "task-a") == 0  # and stays its own
    assert control.circuit_wait("crm", 5, "task-b") > 0
    assert control.circuit_wait("crm", 5) > 0  # a caller with no name is never the probe
    control.circuit_success("crm")
    assert control.circuit_state("crm") == "closed"
    assert control.circuit_wait("crm", 5, "task-b") == 0
