"""The chaos run in its CI size: 5,000 events through every fault, nothing lost, nothing twice."""

from __future__ import annotations

import re

import pytest

from tests.bench.test_bench_smoke import run_bench


@pytest.mark.slow
def test_chaos_run_passes_with_every_fault():
    out = run_bench("bench.chaos", "--events", "5000", "--window", "45", "--seed", "3",
                    "--crm-timeout", "0.5",
                    timeout=900)
    faults = re.findall(r"^\s+[\d.]+s  (.+)$", out, re.M)
    assert sum(f.startswith("SIGKILL worker") for f in faults) == 5, faults
    assert {"Redis killed -9 and restarted on its AOF", "Postgres stopped for 15 s",
            "subscriber refuses connections for 20 s"} <= set(faults), faults
    assert re.search(r"^load: 5000 bodies posted .* 5000 acknowledged with 2xx", out, re.M), out
    assert re.search(r"^events rows: 4500 \(unique bodies acknowledged: 4500\)", out, re.M), out
    for receiver in ("CRM", "subscriber", "e-mail"):
        assert re.search(rf"^{receiver}: routed (\d+), applied \1 .* duplicate side effects 0$",
                         out, re.M), out
    assert out.rstrip().endswith("result: PASS"), out
