"""The benchmarks run end to end in their smallest form; their speed is not judged here."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from tests.conftest import ROOT


def run_bench(*argv: str, timeout: float) -> str:
    """Run a benchmark to its end; one stopped early (its timeout, the test's) is interrupted
    as Ctrl-C would, so it stops the servers it started, then killed with what is left."""
    bench = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = bench.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGINT)
        try:
            bench.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
        raise
    assert bench.returncode == 0, out + err
    return out


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


def test_sustained_bench_reports_the_backlog_and_each_sinks_latency():
    out = run_bench("bench.sustained", "--rates", "100", "--duration", "4", "--settle", "120",
                    timeout=240)
    assert "1 storing node(s) x 1 process(es) + 1 delivering node(s) x 4" in out
    assert re.search(r"^rate 100/s for 4 s: sent 400 of 400 \(100/s\), answers \{202: 400\}",
                     out, re.M), out
    assert re.search(r"backlog \(stream \+ pending deliveries\): peak \d+, growth .* -> "
                     r"(BOUNDED|NOT bounded); settled [\d.]+ s", out), out
    # every acknowledged unique event reached Postgres and the CRM; latencies come from the
    # stores' own timestamps (360 unique bodies: 400 less the 10 % duplicates)
    for sink, n in (("Postgres", r"\d+"), ("CRM", "360"), ("subscriber", r"\d+"),
                    ("e-mail", r"\d+")):
        assert re.search(rf"^  POST -> {sink}\s+p50\s+[\d.]+ ms\s+p99\s+[\d.]+ ms\s+n {n}$",
                         out, re.M), out
    assert re.search(r"cpu over the load .*workers \d+ s", out), out
    assert re.search(r"^highest rate held|^target", out, re.M), out


def test_soak_bench_samples_every_parts_memory_and_prints_slopes():
    out = run_bench("bench.soak", "--rate", "50", "--duration", "8", "--every", "2",
                    "--settle", "120", timeout=240)
    samples = re.findall(r"^\s+\d+(?:\s+\d+\.\d){4}$", out, re.M)
    assert len(samples) >= 3, out
    for part in ("api", "workers", "postgres", "redis"):
        assert re.search(rf"^slope {part}\s+[+-]\d+\.\d\d MiB/min over the run", out, re.M), out


def test_scale_bench_drains_with_each_process_count():
    out = run_bench("bench.scale", "--nodes", "1,2", "--events", "800", timeout=300)
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+([\d.]+)x\s+\d+\s+\d+ us$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert rows[0][2] == "1.00" and all(int(r[1]) > 0 for r in rows), out
    assert out.count("verification: OK") == 2, out
