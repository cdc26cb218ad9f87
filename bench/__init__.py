"""Benchmarks: `python -m bench.ingest` (endpoint vs a bare Flask app) and `python -m bench.drain`.

This module holds what both share: the project paths, a registry of the processes a benchmark
starts (each in a process group of its own, all stopped on exit, error or Ctrl-C), and the
description of the machine and the software versions printed with every result.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from config.local import stop_group

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "rdstation"


class BenchError(RuntimeError):
    """The benchmark could not run or its result failed verification."""


class Processes:
    """Every process a benchmark starts, each the leader of its own process group.

    `stop_all()` signals whole groups (a gunicorn arbiter and its workers, a Celery node and its
    pool), newest first, and escalates to SIGKILL when a group does not exit in time.
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.Popen:
        with open(log, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
             timeout: float = 20) -> None:
        stop_group(proc, sig, timeout)
        # a group's other members (pool children) may outlive its leader for a moment
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks clean up on `kill` as on Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_until(check: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def positive_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of positive numbers ("1,2,4")."""
    import argparse

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of numbers: {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"want positive numbers, got {text!r}")
        return values

    return parse


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _proc_stats() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgrp, utime + stime in clock ticks) of every live process."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        # fields after the command: state ppid pgrp session ... utime(11) stime(12)
        stats[int(entry.name)] = (int(fields[1]), int(fields[2]),
                                  int(fields[11]) + int(fields[12]))
    return stats


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user and system apart) and voluntary context switches of some processes."""

    user: float = 0.0
    system: float = 0.0
    switches: int = 0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user - other.user, self.system - other.system,
                     self.switches - other.switches)


def group_usage(pgid: int) -> Usage:
    """Usage so far of the live processes of one process group, every thread's context switches
    included (a thread's are in its own /proc/PID/task/TID/status)."""
    user = system = switches = 0
    for pid, (_, group, _) in _proc_stats().items():
        if group != pgid:
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            user, system = user + int(fields[11]), system + int(fields[12])
            for task in os.scandir(f"/proc/{pid}/task"):
                with open(f"{task.path}/status") as status:
                    for line in status:
                        if line.startswith("voluntary_ctxt_switches:"):
                            switches += int(line.split()[1])
        except OSError:  # gone meanwhile
            continue
    tick = os.sysconf("SC_CLK_TCK")
    return Usage(user / tick, system / tick, switches)


def tree_pids(root: int, stats: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """A live process and all its live descendants (Postgres backends leave their parent's
    process group, so a group is not enough there)."""
    stats = _proc_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU time used so far by a live process and all its live descendants."""
    stats = _proc_stats()
    ticks = sum(stats[pid][2] for pid in tree_pids(root, stats))
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_memory_bytes(root: int) -> int:
    """Memory of a live process and its live descendants as the sum of their proportional set
    sizes (PSS: a page shared by n processes counts 1/n in each), so Postgres' shared buffers,
    touched by every backend, and the pages a forked pool shares are counted once. Resident
    sizes (RSS) summed over a tree count them in every process. Falls back to RSS where
    /proc/<pid>/smaps_rollup is missing."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) * 1024 for line in rollup
                              if line.startswith("Pss:"))
            continue
        except (OSError, StopIteration, ValueError, IndexError):
            pass
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * page
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command_version(cmd: Sequence[str], pattern: str) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else (out.stdout + out.stderr).strip()[:60]


def versions() -> dict[str, str]:
    """The software a result depends on, as installed on this machine."""
    from config.local import _pg_bin

    try:
        import redis.utils

        hiredis = "with hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser"
    except ImportError:
        hiredis = "?"
    try:
        postgres = _command_version([_pg_bin("postgres"), "--version"], r"(\d+(?:\.\d+)+)")
    except Exception:  # ConfigError when not installed: report, do not fail here
        postgres = "not found"
    return {
        "python": platform.python_version(),
        "redis-server": _command_version(["redis-server", "--version"], r"v=(\S+)"),
        "postgres": postgres,
        "celery": _dist("celery"),
        "redis-py": f"{_dist('redis')} ({hiredis}, hiredis {_dist('hiredis')})",
        "psycopg": _dist("psycopg"),
        "flask": _dist("flask"),
        "gunicorn": _dist("gunicorn"),
        "granian": _dist("granian"),
        "wrk": _command_version(["wrk", "--version"], r"wrk (?:debian/)?(\S+)"),
    }


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        values = [int(x) for x in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over `seconds` (other work skews a benchmark); None off Linux."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(seconds)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    busy = cpu_busy()
    idle = "" if busy is None else f"; {busy:.0%} of the CPUs busy in the second before the run"
    warning = " (OTHER WORK IS RUNNING: numbers will be low and noisy)" if (busy or 0) > 0.15 \
        else ""
    return (f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"{platform.machine()}; load average {load}{idle}{warning}")


def print_versions(keys: Sequence[str], machine_text: str | None = None) -> None:
    """The versions line and the machine line (measure `machine()` early when setup is busy)."""
    found = versions()
    print("  versions     " + ", ".join(f"{k} {found[k]}" for k in keys))
    print(f"  machine      {machine_text or machine()}")
    sys.stdout.flush()
