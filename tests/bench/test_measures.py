"""What the benchmarks measure: the ratio from rounds run side by side, the drain's clock."""

from __future__ import annotations

import argparse
import threading
import time

import redis

from bench.drain import append_all
from bench.ingest import WrkResult, report
from tests.conftest import wait_for


def wrk(rps: float, **errors: int) -> WrkResult:
    requests = int(rps * 10)
    return WrkResult(requests=requests, duration_s=10.0, ok=requests, other=0, non_2xx_3xx=0,
                     socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0, **errors},
                     mean_ms=1.0, p50_ms=1.0, p90_ms=2.0, p99_ms=3.0, max_ms=4.0, output="")


def args(rounds: int) -> argparse.Namespace:
    return argparse.Namespace(rounds=rounds, connections=32, duration=10, server="granian",
                              workers=2, server_threads=16)


def test_the_ratio_is_the_median_of_each_round_s_own_ratio(capsys):
    # medians of each side apart pair ours of round 2 with bare of round 1: 6500/9000 = 0.722,
    # while the rounds, each run under the same conditions, say 0.667, 0.684, 0.875
    results = {"ours": [(wrk(6000), None), (wrk(6500), None), (wrk(7000), None)],
               "bare": [(wrk(9000), None), (wrk(9500), None), (wrk(8000), None)]}
    assert report(args(3), results) == 0
    out = capsys.readouterr().out
    assert "ratio ours/bare: 0.684 (req/s; median of the rounds' ratios, rounds 0.667–0.875)" \
        in out, out


def test_socket_errors_of_either_side_fail_the_verification(capsys):
    # wrk leaves a timed-out request out of its percentiles: a p99 without them is no p99;
    # and errors on the bare side lower the ratio's denominator
    results = {"ours": [(wrk(6000, timeout=3), None)], "bare": [(wrk(9000), None)]}
    assert report(args(1), results) == 1
    assert "ours had 3 socket errors (timeout 3)" in capsys.readouterr().out
    results = {"ours": [(wrk(6000), None)], "bare": [(wrk(9000, connect=5), None)]}
    assert report(args(1), results) == 1
    assert "bare had 5 socket errors (connect 5)" in capsys.readouterr().out


def test_the_drain_s_backlog_appears_at_once_after_the_clock_and_cpu_start(redis_url):
    # the workers read the backlog as soon as it appears: the benchmark must have nothing left
    # to do then (it parsed a 50,000-entry EXEC reply while they stored), and its CPU reading
    # and clock come first. A pump already blocked in XREADGROUP is served by the rename.
    from ingest.queue import GROUP, IngestStream

    client = redis.Redis.from_url(redis_url)
    key = f"drain-clock-{time.time_ns()}"
    IngestStream(client, key).ensure_group()  # as the pumps found it
    served: list[tuple[float, int]] = []

    def pump() -> None:
        reader = redis.Redis.from_url(redis_url, client_name="drain-clock-pump")
        reply = reader.xreadgroup(GROUP, "pump", {key: ">"}, count=5000, block=10_000)
        served.append((time.time(), len(reply[0][1]) if reply else 0))

    blocked = threading.Thread(target=pump)
    blocked.start()
    def waiting() -> bool:  # blocked in its XREADGROUP
        return any(c.get("name") == "drain-clock-pump" and c.get("cmd") == "xreadgroup"
                   and "b" in c.get("flags", "") for c in client.client_list())

    wait_for(waiting, what="the pump blocked on the stream")
    time.sleep(0.2)
    seen: list[int] = []
    try:
        _, appeared = append_all(client, key, [b'{"n": %d}' % n for n in range(2000)],
                                 staged=True, before=lambda: seen.append(client.xlen(key)))
        blocked.join(15)
        assert seen == [0]  # the reading came before any entry could be read
        [(when, count)] = served
        assert count == 2000 and appeared <= when < appeared + 2  # at once, and whole
        first = client.xrange(key, count=1)[0][0]
        assert appeared >= int(first.split(b"-")[0]) / 1000  # made before the clock
    finally:
        client.delete(key, f"{key}:staged")
