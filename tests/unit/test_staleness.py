"""sync.max_staleness is enforced exactly when the driver builds a training batch."""

from __future__ import annotations

import pytest

from reward_workers.interface import ScoredRollout
from rollout_workers.interface import Rollout
from services.config import load_config
from services.orchestrator.batch import build_batch
from tests.unit.test_config_data import EXAMPLE


def scored(prompt_id: str, index: int, version: int, reward: float) -> ScoredRollout:
    rollout = Rollout(prompt_id, index, [1, 2], [3, 4], [-0.5, -0.5], version, "stop", "x")
    return ScoredRollout(rollout, reward)


@pytest.mark.parametrize(
    "max_staleness, learner_version, kept_versions",
    [
        (0, 2, {2}),
        (1, 2, {1, 2}),
        (2, 2, {0, 1, 2}),
        (1, 5, set()),
    ],
)
def test_rollouts_older_than_max_staleness_are_dropped_and_counted(
    max_staleness, learner_version, kept_versions
):
    cfg = load_config(EXAMPLE, [f"sync.max_staleness={max_staleness}"])
    batch_in = [scored(f"p{v}", i, v, reward=float(i)) for v in (0, 1, 2) for i in range(2)]
    built = build_batch(cfg, step=3, scored=batch_in, policy_version=learner_version)
    batch, zero_signal, stale = built.batch, built.zero_signal_groups, built.stale_dropped
    assert {s.policy_version for s in batch.samples} == kept_versions
    assert stale == 6 - len(batch.samples)
    assert zero_signal == 0
    assert all(learner_version - s.policy_version <= max_staleness for s in batch.samples)


def test_zero_signal_groups_are_counted_and_skipped():
    cfg = load_config(EXAMPLE)
    batch_in = [scored("flat", i, 0, 0.5) for i in range(3)] + [
        scored("live", i, 0, float(i)) for i in range(3)
    ]
    built = build_batch(cfg, step=0, scored=batch_in, policy_version=0)
    batch, zero_signal, stale = built.batch, built.zero_signal_groups, built.stale_dropped
    assert zero_signal == 1 and stale == 0
    assert {s.sample_id.split("#")[0] for s in batch.samples} == {"live"}
    advantages = [s.advantage for s in batch.samples]
    assert advantages[0] < 0 < advantages[2] and abs(sum(advantages)) < 1e-5
