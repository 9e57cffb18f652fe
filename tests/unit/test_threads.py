"""The learner's thread governor against real load: processes that spin on every core, then none."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from learner.threads import MIN_INTERVAL_S, ThreadGovernor, usable_cores

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def compute_for(seconds: float) -> None:
    """The learner's own work between two looks (this process's CPU, not the others')."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores to have one to give")
def test_threads_follow_the_cores_the_others_leave_free(restore_threads):
    cores = usable_cores()
    governor = ThreadGovernor("follow_free", base_threads=1, cores=cores)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(cores)]
    try:
        compute_for(0.2)  # let them start spinning before the window
        governor.adjust()  # the window starts here
        compute_for(4 * MIN_INTERVAL_S)
        assert governor.adjust() == 1  # every core busy elsewhere: the fixed share only
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    compute_for(4 * MIN_INTERVAL_S)
    assert governor.adjust() >= 2  # the others are gone: their cores are ours
    assert torch.get_num_threads() == governor.threads
    assert 1.0 <= governor.mean_threads() <= governor.threads


def test_fixed_threads_never_change(restore_threads):
    governor = ThreadGovernor("fixed", base_threads=1, cores=max(2, usable_cores()))
    compute_for(2 * MIN_INTERVAL_S)
    assert governor.adjust() == 1
    assert torch.get_num_threads() == 1


def test_a_window_too_short_keeps_the_count(restore_threads):
    governor = ThreadGovernor("follow_free", base_threads=1, cores=max(2, usable_cores()))
    assert governor.adjust() == 1  # called at once: no window to measure
