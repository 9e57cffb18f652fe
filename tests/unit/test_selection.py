"""The rules that pick a step's prompts (services/orchestrator/selection.py): dynamic sampling's
round size, the difficulty filter, and the exactly-once bookkeeping of a resumed or rolled-back
run -- driven in the driver's order by `Schedule`, with rewards from a function of the prompt id
instead of a model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from core.config import ConfigError
from reward_workers.interface import ScoredRollout
from rollout_workers.interface import Rollout
from services.config import DifficultyFilterConfig, load_config
from services.orchestrator.batch import group_requests, groups_of
from services.orchestrator.checkpoints import DriverState
from services.orchestrator.selection import DifficultyFilter, PromptSource, extra_prompts_wanted
from services.orchestrator.setup import JobInputs
from tests.unit.test_config_data import EXAMPLE

FLAT_IDS = {"i1", "i4", "i6", "i7", "i8"}  # every sample of these gets the same reward
OVERRIDES = [
    "steps=8",
    "prompts_per_step=4",
    "rollout.samples_per_prompt=2",
    "algorithm.min_signal_groups=3",
    "algorithm.max_extra_prompts=4",
    "data.difficulty_filter={visits: 1, skip_probability: 0.9}",
]


def signal_reward(prompt_id: str, sample_index: int) -> float:
    return 0.0 if prompt_id in FLAT_IDS else float(sample_index % 2)


def job_inputs(num_items: int) -> JobInputs:
    items = [{"id": f"i{n}", "prompt": f"item {n}"} for n in range(num_items)]
    return JobInputs(Path("."), items, [], {i["id"]: i for i in items}, {i["id"]: [1, 2] for i in items})


class Schedule:
    """Takes prompts in the driver's order (submit ahead to s + max_staleness, collect step s and
    top it up, record), scoring with `reward(prompt_id, sample_index)`. `stream` holds each step's
    scored rollouts as the scored-rollout stream does; a step found there is replayed."""

    def __init__(self, cfg, inputs, reward, state: DriverState | None = None, stream=None):
        self.cfg, self.inputs, self.reward = cfg, inputs, reward
        self.state = copy.deepcopy(state or DriverState())
        self.source = PromptSource(cfg, inputs.train_items)
        self.source.resume(self.state)
        self.stream = dict(stream or {})
        self.submitted = self.state.step - 1
        self.steps: dict[int, tuple[list[str], int, int]] = {}  # step -> (its groups' ids, extra, skipped)
        self.saved: dict[int, DriverState] = {}  # steps done -> the driver state then

    def run(self, until: int) -> Schedule:
        while self.state.step < until:
            step = self.state.step
            for ahead in range(
                self.submitted + 1, min(step + self.cfg.sync.max_staleness, self.cfg.steps - 1) + 1
            ):
                self.source.for_step(ahead)
                self.submitted = ahead
            if step not in self.stream:
                self.stream[step] = self.generate(step)
            taken = self.source.complete(step, self.stream[step])
            self.source.record(self.stream[step])
            self.state.step = step + 1
            self.source.save(self.state)
            ids = sorted(key[0] for key in groups_of(self.stream[step], self.cfg.rollout.samples_per_prompt))
            self.steps[step] = (ids, taken.extra, taken.skipped)
            self.saved[step + 1] = copy.deepcopy(self.state)
        return self

    def generate(self, step: int) -> list[ScoredRollout]:
        scored = self.score(step, first=0)
        while added := self.source.take_extra(step, scored):
            scored += self.score(step, first=len(self.source.steps[step].items) - added)
        return scored

    def score(self, step: int, first: int) -> list[ScoredRollout]:
        requests = group_requests(self.cfg, self.inputs, self.source.steps[step].items, first)
        return [
            ScoredRollout(
                Rollout(r.prompt_id, r.sample_index, [1], [2], [-1.0], 0, "stop", "x"),
                self.reward(r.prompt_id, r.sample_index),
            )
            for r in requests
        ]


def test_round_size_follows_the_signal_rate_within_the_bound():
    assert extra_prompts_wanted(min_signal=6, budget_left=16, signal=6, groups=8) == 0  # enough
    assert extra_prompts_wanted(min_signal=6, budget_left=0, signal=2, groups=8) == 0  # bound reached
    assert extra_prompts_wanted(min_signal=6, budget_left=16, signal=4, groups=8) == 4  # 2 / (5/10)
    assert extra_prompts_wanted(min_signal=6, budget_left=16, signal=0, groups=8) == 16  # no signal yet
    assert extra_prompts_wanted(min_signal=6, budget_left=3, signal=5, groups=8) == 2  # 1 / (6/10)


def test_filter_skips_only_after_k_flat_visits_and_a_signal_visit_clears_it():
    flt = DifficultyFilter(DifficultyFilterConfig(visits=2, skip_probability=0.5), seed=0)
    flat = [ScoredRollout(Rollout("a", k, [1], [2], [-1.0], 0, "stop", "x"), 1.0) for k in range(2)]
    live = [ScoredRollout(Rollout("a", k, [1], [2], [-1.0], 0, "stop", "x"), float(k)) for k in range(2)]
    positions = range(1000)
    flt.record(flat, samples_per_prompt=2)
    assert not any(flt.skips("a", p) for p in positions)  # one flat visit: not yet
    flt.record(flat, samples_per_prompt=2)
    skipped = [p for p in positions if flt.skips("a", p)]
    assert 400 < len(skipped) < 600 and not any(flt.skips("b", p) for p in positions)
    assert skipped == [p for p in positions if flt.skips("a", p)]  # drawn by position: the same again
    flt.record(live, samples_per_prompt=2)
    assert flt.flat_streaks == {} and not any(flt.skips("a", p) for p in positions)


def test_an_item_taken_twice_in_a_step_has_two_groups_with_their_own_sample_ids():
    cfg = load_config(EXAMPLE, ["rollout.samples_per_prompt=2"])
    requests = group_requests(cfg, job_inputs(4), items=[3, 1, 3], first=0)
    assert [r.sample_id for r in requests] == ["i3#0", "i3#1", "i1#0", "i1#1", "i3#2", "i3#3"]
    assert [r.sample_id for r in group_requests(cfg, job_inputs(4), items=[3, 1, 3], first=2)] == [
        "i3#2",
        "i3#3",
    ]


def test_dynamic_sampling_tops_up_to_the_target_or_the_bound_and_counts_add_up():
    cfg = load_config(EXAMPLE, OVERRIDES)
    run = Schedule(cfg, job_inputs(10), signal_reward).run(cfg.steps)
    taken = 0
    for ids, extra, skipped in run.steps.values():
        signal = sum(i not in FLAT_IDS for i in ids)
        assert len(ids) == cfg.prompts_per_step + extra and extra <= cfg.algorithm.max_extra_prompts
        assert signal >= cfg.algorithm.min_signal_groups or extra == cfg.algorithm.max_extra_prompts
        taken += len(ids) + skipped
    assert run.state.data_cursor == taken  # every prompt drawn is in a step or counted as skipped
    assert any(extra for _, extra, _ in run.steps.values())
    assert sum(skipped for *_, skipped in run.steps.values()) > 0


def test_all_flat_prompts_stop_at_the_bound():
    cfg = load_config(EXAMPLE, [*OVERRIDES, "data.difficulty_filter=null"])
    run = Schedule(cfg, job_inputs(10), lambda prompt_id, index: 0.5).run(3)
    assert [(len(ids), extra) for ids, extra, _ in run.steps.values()] == [(8, 4)] * 3


@pytest.mark.parametrize("checkpoint_step", [1, 2])
def test_a_resumed_run_takes_the_same_prompts_as_an_uninterrupted_one(checkpoint_step):
    """The process dies after step `checkpoint_step + 1` was scored (in the stream) but before it
    trained; the resumed run replays it, taking its extra prompts again, then goes on."""
    cfg = load_config(EXAMPLE, OVERRIDES)
    inputs = job_inputs(10)
    straight = Schedule(cfg, inputs, signal_reward).run(cfg.steps)
    crashed = Schedule(cfg, inputs, signal_reward).run(checkpoint_step + 1)
    in_stream = {checkpoint_step: crashed.stream[checkpoint_step]}
    resumed = Schedule(cfg, inputs, signal_reward, crashed.saved[checkpoint_step], in_stream).run(cfg.steps)
    assert resumed.steps == {s: v for s, v in straight.steps.items() if s >= checkpoint_step}
    assert resumed.state == straight.state
    assert straight.steps[checkpoint_step][1] > 0  # the replayed step had extra prompts
    assert sum(skipped for s, (*_, skipped) in straight.steps.items() if s > checkpoint_step) > 0


def test_a_learner_restart_replays_from_the_checkpoint_and_goes_on_as_before():
    """Same process: the prompts taken stand; the filter's history goes back to the checkpoint's
    and the replayed steps rebuild it (three flat visits to skip: replayed onto the history of step
    4 instead, they would count twice)."""
    cfg = load_config(EXAMPLE, [*OVERRIDES, "data.difficulty_filter={visits: 3, skip_probability: 0.9}"])
    inputs = job_inputs(10)
    straight = Schedule(cfg, inputs, signal_reward).run(cfg.steps)
    run = Schedule(cfg, inputs, signal_reward).run(4)
    run.state = copy.deepcopy(run.saved[2])  # roll_back to the checkpoint after step 2
    run.source.rewind(run.state)
    run.run(cfg.steps)
    assert run.steps == straight.steps and run.state == straight.state
    assert sum(skipped for s, (*_, skipped) in straight.steps.items() if s >= 4) > 0


def test_an_old_checkpoint_without_pending_prompts_resumes_from_its_cursor():
    cfg = load_config(EXAMPLE, ["prompts_per_step=2", "rollout.samples_per_prompt=2"])
    inputs = job_inputs(10)
    straight = Schedule(cfg, inputs, signal_reward).run(6)
    old_format = DriverState(step=3, data_cursor=3 * 2)  # the first prompt not trained
    resumed = Schedule(cfg, inputs, signal_reward, old_format).run(6)
    assert resumed.steps == {s: v for s, v in straight.steps.items() if s >= 3}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.min_signal_groups=9"],
            "algorithm.min_signal_groups=9 must be at most prompts_per_step=8",
        ),
        (["algorithm.max_extra_prompts=4"], "algorithm.max_extra_prompts bounds dynamic sampling"),
        (["algorithm.min_signal_groups=0"], "algorithm.min_signal_groups: Input should be greater than"),
        (["data.difficulty_filter={skip_probability: 1.0}"], "data.difficulty_filter.skip_probability"),
        (["data.difficulty_filter={visits: 0}"], "data.difficulty_filter.visits"),
    ],
)
def test_bad_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXAMPLE, overrides)


def test_the_bound_defaults_to_twice_the_prompts_per_step():
    assert load_config(EXAMPLE, ["algorithm.min_signal_groups=6"]).algorithm.max_extra_prompts == 16
    assert load_config(EXAMPLE).algorithm.max_extra_prompts is None
