"""train.num_threads: the rule that picks PyTorch's CPU threads from the cores other work leaves free."""

import multiprocessing
import os

import pytest
import torch

from moedpo import threads
from moedpo.config import ConfigError, load_config


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    ("cpus", "busy", "processes", "expected"),
    [
        (2, 0.0, 1, 2),  # an idle machine: every core
        (2, 0.3, 1, 2),  # a little background work does not cost a core
        (2, 1.0, 1, 1),  # one core held by another process
        (2, 1.9, 1, 1),  # never fewer than one
        (2, 0.0, 2, 1),  # two local processes share the cores
        (8, 3.0, 1, 5),
        (8, 2.0, 2, 3),
    ],
)
def test_auto_takes_the_free_cores(monkeypatch, no_omp, cpus, busy, processes, expected):
    monkeypatch.setattr(threads, "cores", lambda: list(range(cpus)))
    monkeypatch.setattr(threads, "busy_cores", lambda c: busy)
    assert threads.choose("auto", processes) == expected


def test_a_number_or_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda c: pytest.fail("an explicit count samples nothing"))
    assert threads.choose(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose("auto") == torch.get_num_threads()


def test_busy_cores_reads_the_non_idle_share(monkeypatch):
    """cpu0 idle 50 of 100 jiffies, cpu1 idle throughout: half of one core, 0.5."""
    readings = iter([[(1000, 5000), (2000, 6000)], [(1050, 5100), (2100, 6100)]])
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(readings))
    assert threads.busy_cores([0, 1], interval=0) == pytest.approx(0.5)


def _spin():
    while True:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_busy_cores_sees_a_process_that_holds_a_core():
    cpu = threads.cores()[-1]
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        threads.busy_cores([cpu], interval=0.5)  # let it start spinning
        assert threads.busy_cores([cpu], interval=0.5) > 0.8
    finally:
        spinner.kill()
        spinner.join()


def test_the_previous_count_comes_back():
    before = torch.get_num_threads()
    with threads.cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "two", "true", "1.5"])
def test_bad_thread_counts_are_named(value):
    with pytest.raises(ConfigError, match="train.num_threads=.*expected auto or an integer >= 1"):
        load_config(overrides=[f"train.num_threads={value}"])
    assert load_config(overrides=["train.num_threads=2"]).train.num_threads == 2
