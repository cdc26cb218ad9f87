"""The dashboard's arithmetic: percentiles from histogram buckets, per-minute counters."""

from __future__ import annotations

import time

import pytest
import redis

from workers.dashboard import _sink_hour, _sum, p95
from workers.metrics import MINUTE_TTL_SECONDS, Recorder


def test_p95_interpolates_within_the_bucket_like_prometheus():
    # bounds 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 (the duration's)
    assert p95({}) is None
    assert p95({0.005: 100.0}) == pytest.approx(0.00475)  # from 0 to the first bound
    # within a bucket, from the bound defined before it (not the last bucket with calls)
    assert p95({0.01: 100.0}) == pytest.approx(0.005 + 0.005 * 0.95)
    assert p95({0.5: 100.0}) == pytest.approx(0.25 + 0.25 * 0.95)  # all 0.4 s: 487.5 ms
    assert p95({0.01: 50.0, 0.1: 50.0}) == pytest.approx(0.05 + 0.05 * 0.9)
    # past the last bound (calls over 30 s): that bound, as histogram_quantile gives it
    assert p95({"+Inf": 45.0}) == 30
    assert p95({0.01: 5.0, "+Inf": 95.0}) == 30
    assert p95({0.01: 1.0}, bounds=(0.01, 0.1)) == pytest.approx(0.0095)


def test_counts_land_in_the_minute_they_were_flushed(redis_url):
    recorder = Recorder(redis.Redis.from_url(redis_url), f"m{time.time_ns()}")
    recorder.inc("leadpipe_ingest_requests", 3, status="202")
    recorder.inc("leadpipe_ingest_requests", 1, status="401")
    recorder.inc("leadpipe_deliveries", 2, sink="crm", outcome="delivered")
    recorder.inc("leadpipe_deliveries", 1, sink="crm", outcome="dead")
    recorder.observe("leadpipe_delivery_duration_seconds", 0.02, sink="crm", outcome="delivered")
    recorder.flush()
    minutes = recorder.minutes(3)
    assert [m for m, _ in minutes] == list(range(minutes[-1][0] - 2, minutes[-1][0] + 1))
    rows = minutes[-1][1] or minutes[-2][1]  # the flush may have crossed a minute's end
    sums = _sum(rows)
    assert (sums["in"], sums["delivered"], sums["failed"], sums["dead"]) == (3, 2, 1, 1)
    assert _sink_hour(rows)["crm"]["success_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert 10 < _sink_hour(rows)["crm"]["p95_ms"] <= 25
    ttl = recorder.client.ttl(recorder.minute_key(minutes[-1][0]) if minutes[-1][1]
                              else recorder.minute_key(minutes[-2][0]))
    assert 0 < ttl <= MINUTE_TTL_SECONDS

