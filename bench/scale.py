"""Scale-out on one machine: the drain with 1, 2, 4 … worker processes on the same stream.

    python -m bench.scale [--nodes 1,2,4] [--events 30000]

Runs `python -m bench.drain --nodes N --concurrency 1` once per N (each a fresh Redis and
Postgres, the same seeded backlog), prints each run's result lines, then a table: events/s,
speed-up over one process, and the workers' CPU per stored event. Work that divides without
coordination overhead keeps the CPU per event flat as nodes are added; the speed-up then
stops only where the machine's cores (shared with Postgres and Redis) run out.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from bench import ROOT, machine, positive_list

RATE = re.compile(r"^rate: (\d+) events/s", re.M)
CPU = re.compile(r"workers ([\d.]+) s \((\d+) us/event\)")
SHOWN = ("drain:", "rate:", "cpu during", "rows:", "verification:")


def run(nodes: int, events: int, seed: int) -> tuple[int, int | None, str]:
    cmd = [sys.executable, "-m", "bench.drain", "--nodes", str(nodes), "--concurrency", "1",
           "--events", str(events), "--seed", str(seed)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    out = result.stdout
    if result.returncode != 0 or "verification: OK" not in out:
        raise SystemExit(f"bench.scale: the drain with {nodes} node(s) failed:\n{out}\n"
                         f"{result.stderr[-3000:]}")
    rate = RATE.search(out)
    cpu = CPU.search(out)
    return int(rate.group(1)) if rate else 0, int(cpu.group(2)) if cpu else None, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default=[1, 2, 4], type=positive_list(int),
                        help="worker process counts (1,2,4)")
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=20240501)
    args = parser.parse_args(argv)
    counts = args.nodes
    print("bench.scale: the same backlog drained by 1, 2, 4 … worker processes")
    print(f"  machine      {machine()}")
    print(f"  runs         `python -m bench.drain --nodes N --concurrency 1 --events "
          f"{args.events} --seed {args.seed}` for N in {counts}")
    rows = []
    for nodes in counts:
        print(f"--- {nodes} node(s)", flush=True)
        rate, cpu, out = run(nodes, args.events, args.seed)
        for line in out.splitlines():
            if line.startswith(SHOWN):
                print(f"  {line}")
        rows.append((nodes, rate, cpu))
    base = rows[0][1] or 1
    print(f"scale-out ({os.cpu_count()} CPUs, shared with Postgres and Redis)")
    print("  processes   events/s   speed-up   per process   workers' CPU per event")
    for nodes, rate, cpu in rows:
        print(f"  {nodes:9d}   {rate:8d}   {rate / base:7.2f}x   {rate / nodes:11.0f}   "
              f"{cpu if cpu is not None else '?':>6} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
