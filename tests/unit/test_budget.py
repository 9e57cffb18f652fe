"""The wall-clock budget's stop rule (`max_minutes`) and its config field."""

from __future__ import annotations

import time

import pytest

from core.config import ConfigError
from services.config import load_config
from services.orchestrator.budget import WallClockBudget, one_more_step_fits
from tests.unit.test_config_data import write_config


def test_one_more_step_fits_while_elapsed_plus_the_median_step_is_within_the_budget():
    assert one_more_step_fits(elapsed_s=50, step_seconds=[10], budget_s=60)  # ends at 60: fits
    assert not one_more_step_fits(elapsed_s=50.5, step_seconds=[10], budget_s=60)
    # The median: one long step (an evaluation, a checkpoint) does not stand for all.
    assert one_more_step_fits(elapsed_s=50, step_seconds=[5, 100, 6], budget_s=60)
    assert not one_more_step_fits(elapsed_s=50, step_seconds=[5, 100, 100], budget_s=60)
    with pytest.raises(ValueError, match="no step time"):
        one_more_step_fits(elapsed_s=0, step_seconds=[], budget_s=60)


def test_elapsed_counts_from_the_job_start_and_steps_from_the_loop_start():
    # The job started 2 minutes ago (actors, base evaluation); a 1-minute budget is spent.
    spent = WallClockBudget(1.0, started_at=time.perf_counter() - 120)
    spent.steps_begin()
    assert not spent.step_ended()
    assert len(spent.step_seconds) == 1 and spent.step_seconds[0] < 120  # the loop's start, not the job's
    roomy = WallClockBudget(600.0, started_at=time.perf_counter())
    roomy.steps_begin()
    assert roomy.step_ended() and roomy.step_ended()
    assert len(roomy.step_seconds) == 2
    assert WallClockBudget(None, started_at=time.perf_counter() - 1e6).step_ended()  # no budget


def test_max_minutes_is_a_top_level_override_and_must_be_positive(tmp_path):
    config = write_config(tmp_path)
    assert load_config(config).max_minutes is None
    assert load_config(config, ["max_minutes=30"]).max_minutes == 30.0
    with pytest.raises(ConfigError, match=r"max_minutes: Input should be greater than 0"):
        load_config(config, ["max_minutes=0"])
    with pytest.raises(ConfigError, match=r"max_minutes:.*'soon'"):
        load_config(config, ["max_minutes=soon"])
