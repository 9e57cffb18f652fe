"""The learner's thread governor against real load: processes that spin on every core, then none.

Each scenario runs in a fresh interpreter: vLLM on CPU, once it has run in a process (other tests
do, in pytest's), turns torch.set_num_threads into a no-op there. The learner's ranks are their
own processes, without vLLM."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import pytest

from learner.threads import MIN_INTERVAL_S, usable_cores

IDLE_WINDOWS = 20
SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def compute_for(seconds: float) -> None:
    """The learner's own work between two looks (this process's CPU, not the others')."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def in_fresh_process(scenario):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(scenario)


def busy_then_idle() -> dict:
    import torch

    from learner.threads import ThreadGovernor

    cores = usable_cores()
    governor = ThreadGovernor("follow_free", base_threads=1, cores=cores)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(cores)]
    try:
        compute_for(0.2)  # let them start spinning before the window
        governor.adjust()  # the window starts here
        compute_for(4 * MIN_INTERVAL_S)
        busy = governor.adjust()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    # Idle: within a few windows (a process that was winding down, e.g. another test's Ray,
    # may still hold a core for a moment; the bound keeps a broken governor from passing).
    for _ in range(IDLE_WINDOWS):
        compute_for(4 * MIN_INTERVAL_S)
        if (idle := governor.adjust()) >= 2:
            break
    return {"busy": busy, "idle": idle, "torch": torch.get_num_threads(), "mean": governor.mean_threads()}


def fixed_and_too_soon() -> dict:
    import torch

    from learner.threads import ThreadGovernor

    cores = max(2, usable_cores())
    soon = ThreadGovernor("follow_free", base_threads=1, cores=cores).adjust()  # no window yet
    governor = ThreadGovernor("fixed", base_threads=1, cores=cores)
    compute_for(2 * MIN_INTERVAL_S)
    return {"soon": soon, "fixed": governor.adjust(), "torch": torch.get_num_threads()}


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores to have one to give")
def test_threads_follow_the_cores_the_others_leave_free():
    seen = in_fresh_process(busy_then_idle)
    assert seen["busy"] == 1  # every core busy elsewhere: the fixed share only
    assert seen["idle"] >= 2  # the others are gone: their cores are ours
    assert seen["torch"] == seen["idle"]
    assert 1.0 <= seen["mean"] <= seen["idle"]


def test_fixed_threads_never_change_and_a_window_too_short_keeps_the_count():
    seen = in_fresh_process(fixed_and_too_soon)
    assert seen == {"soon": 1, "fixed": 1, "torch": 1}
