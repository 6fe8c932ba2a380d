"""The engine thread's wait for a core (``replicas/cpu_wait``): real scheduler statistics of a
thread made to share its core with busy processes, and a clean zero where none are reported."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kvmesh.replicas.cpu_wait import CpuWaitMeter, run_queue_seconds


@pytest.mark.skipif(
    run_queue_seconds() is None or not hasattr(os, "sched_setaffinity"),
    reason="no per-thread scheduler statistics (or CPU affinity) on this system",
)
def test_a_thread_sharing_its_core_with_busy_processes_counts_its_wait():
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    busy = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )
        for _ in range(2)
    ]
    try:
        os.sched_setaffinity(0, {core})  # this thread only
        time.sleep(0.2)  # let the busy processes start spinning
        meter = CpuWaitMeter()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            pass
        meter.sample()
    finally:
        os.sched_setaffinity(0, before)
        for p in busy:
            p.kill()
            p.wait()
    # Three runnable threads on one core: this one waits for about two thirds of the time.
    assert 0.15 < meter.total < 0.6


def test_no_statistics_means_zero_not_an_error(tmp_path):
    meter = CpuWaitMeter(path=str(tmp_path / "absent"))
    meter.sample()
    assert meter.total == 0.0
    bad = tmp_path / "schedstat"
    bad.write_text("garbage")
    assert run_queue_seconds(str(bad)) is None
