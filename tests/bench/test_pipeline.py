"""The benchmark pipeline notices a process that stopped on its own."""

from __future__ import annotations

import subprocess

import pytest

from bench import BenchError
from bench.pipeline import Pipeline


def test_a_process_that_exited_is_named_with_its_code(tmp_path):
    pipe = Pipeline(tmp_path, crm=None, subscriber=None, namespace="t")
    pipe.api_proc = subprocess.Popen(["sleep", "30"])
    pipe.workers = [subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sh", "-c", "exit 3"])]
    try:
        pipe.workers[1].wait(timeout=10)
        assert pipe.exited() == [("worker-1", 3)]
        with pytest.raises(BenchError, match="worker-1 exited with code 3"):
            pipe.check_alive()
        pipe.workers[1] = subprocess.Popen(["sleep", "30"])  # restarted, as after a kill
        assert pipe.exited() == []
        pipe.check_alive()
    finally:
        for proc in [pipe.api_proc, *pipe.workers]:
            proc.kill()
            proc.wait()
