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


def test_a_rate_whose_step_is_not_whole_milliseconds_holds_across_workers(redis_client):
    # 3/s is one every 333.33 ms: a wait under 1 ms used to come back as 0 (Redis truncates a
    # script's number), read as "allowed" though nothing was counted; two workers sleeping
    # the truncated waits woke inside that window again and again
    import threading

    control = SinkControl(redis_client, f"rate{uuid.uuid4().hex}")
    sent: list[float] = []
    deadline = time.monotonic() + 3.0

    def worker() -> None:  # what delivery._deliver_all does before each send
        while time.monotonic() < deadline:
            wait = control.rate_wait("crm", 3, 1.0)
            while wait > 0:
                time.sleep(wait)
                wait = control.rate_wait("crm", 3, 1.0)
            sent.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sent) <= 3 * 3 + 3, len(sent)  # 3 s at 3/s, and the last waits of each thread
    gaps = [b - a for a, b in zip(sorted(sent), sorted(sent)[1:], strict=False)]
    assert min(gaps) > 0.3, sorted(gaps)[:5]


def test_a_rate_past_a_thousand_a_second_is_held_to_the_microsecond(redis_client):
    # in milliseconds, every wait was at least 1 ms: no more than 1,000/s could pass, and a
    # lone worker lost up to 1 ms per send well below that
    control = SinkControl(redis_client, f"fast{uuid.uuid4().hex}")
    for sink in ("a", "b", "c", "d", "e"):  # (a call slower than the step would find it due)
        assert control.rate_wait(sink, 1000, 1.0) == 0
        wait = control.rate_wait(sink, 1000, 1.0)
        if wait:
            break
    assert 0 < wait < 0.001  # the 1 ms step, less what the second call took
    allowed, started = 0, time.monotonic()
    while time.monotonic() - started < 0.5:
        wait = control.rate_wait("crm", 4000, 1.0)
        if wait == 0:
            allowed += 1
        else:
            time.sleep(wait)
    assert allowed <= 4000 * 0.5 + 2
