"""Soak: a steady rate for a long time, every part's memory sampled, and the trend of each.

    python -m bench.soak [--rate 150] [--duration 600] [--every 10]

The pipeline and load of bench.sustained (every sink on), held at one rate — by default half of
what docs/PERFORMANCE.md reports as held — while the memory of each part's process tree (API,
worker nodes, Postgres, Redis; the sum of the processes' proportional set sizes, so shared
pages count once) is read every --every seconds. Prints the samples,
and per part the least-squares slope in MiB per minute over the whole run and over its second
half: a leak shows as a slope that does not fall to about zero once the caches are warm.
"""

from __future__ import annotations

import argparse
import sys

from bench import BenchError, machine, terminate_as_interrupt
from bench.sustained import Bench, Step, add_arguments, report, slope

MIB = 1024 * 1024


def trends(step: Step) -> list[str]:
    sampled = [s for s in step.samples if s.memory]
    if not sampled:
        return ["memory: no samples"]
    parts = list(sampled[0].memory)
    lines = ["memory (PSS summed over each part's process tree, MiB)",
             "      s  " + "  ".join(f"{p:>9}" for p in parts)]
    for s in sampled:
        lines.append(f"  {s.at:5.0f}  " + "  ".join(f"{s.memory[p] / MIB:9.1f}" for p in parts))
    half = step.duration / 2
    for part in parts:
        whole = slope([(s.at / 60, s.memory[part] / MIB) for s in sampled])
        late = slope([(s.at / 60, s.memory[part] / MIB) for s in sampled if s.at >= half])
        first, last = sampled[0].memory[part] / MIB, sampled[-1].memory[part] / MIB
        lines.append(f"slope {part:<9} {whole:+7.2f} MiB/min over the run, {late:+7.2f} MiB/min "
                     f"over its second half ({first:.1f} -> {last:.1f} MiB)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=150.0, help="POSTs per second (150)")
    parser.add_argument("--every", type=float, default=10.0,
                        help="seconds between memory samples (10)")
    add_arguments(parser)
    parser.set_defaults(duration=600.0)
    args = parser.parse_args(argv)
    print("bench.soak: a steady rate through every sink, memory sampled")
    machine_text = machine()
    bench = Bench(args, "soak")
    try:
        with terminate_as_interrupt():
            bench.describe(machine_text)
            print(f"  soak         {args.rate:.0f}/s for {args.duration:.0f} s, memory every "
                  f"{args.every:.0f} s")
            bench.start()
            step = bench.step(args.rate, args.duration, memory_every=args.every)
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.soak: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    for line in report(step, max(1, round(args.rate * args.duration))):
        print(line)
    for line in trends(step):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
