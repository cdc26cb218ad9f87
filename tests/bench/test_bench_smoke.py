"""The benchmarks run end to end in their smallest form; their speed is not judged here."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def run_bench(*argv: str, timeout: float) -> str:
    result = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return result.stdout


def test_ingest_bench_prints_both_apps_and_the_ratio():
    out = run_bench("bench.ingest", "--duration", "2", "--warmup", "1", timeout=90)
    assert "configuration" in out and "granian" in out and "python 3." in out
    for name in ("ours", "bare"):
        assert re.search(rf"^  {name}\s+req/s\s+[\d.]+\s+p50\s+[\d.]+ ms\s+p99\s+[\d.]+ ms",
                         out, re.M), out
    assert re.search(r"^ratio ours/bare: \d+\.\d+", out, re.M), out
    assert re.search(r"stream check: \d+ answered 2xx .* -> OK", out), out
    assert "verification: OK" in out


def test_drain_bench_stores_every_unique_event_exactly():
    out = run_bench("bench.drain", "--events", "2000", "--warm", "35", timeout=120)
    assert "2 x `python -m config.cli worker --concurrency 1`" in out
    assert re.search(r"^rate: \d+ events/s .*, \d+ entries/s", out, re.M), out
    assert re.search(r"^rows: events 1800, leads \d+, deals \d+, duplicates counted 200", out,
                     re.M), out
    assert "verification: OK" in out
