"""Reward workers on a real local Ray cluster, and the Ray-free score_locally."""

from __future__ import annotations

import threading

import pytest
import ray
from ray.exceptions import RayActorError

from reward_workers.config import RewardConfig
from reward_workers.grader_spec import PythonGrader
from reward_workers.pool import RewardPool, score_locally
from rollout_workers.interface import Rollout

# Reward 1 for the right answer; item["delay_s"] makes grading take a while (work, not syncing).
GRADER = """
import time

def grade(sample, item):
    time.sleep(item.get("delay_s", 0))
    right = sample["output_text"].strip() == item["reward_model"]["ground_truth"]
    return {"reward": float(right), "components": {"length": float(len(sample["output_text"]))}}
"""


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reward_cfg(tmp_path_factory) -> RewardConfig:
    path = tmp_path_factory.mktemp("grader") / "grader.py"
    path.write_text(GRADER)
    return RewardConfig(grader=PythonGrader(source=str(path)), num_workers=2, timeout_s=10.0)


@pytest.fixture(scope="module")
def pool(ray_cluster, reward_cfg):
    """One pool for the module: starting reward-worker actors is the slow part."""
    pool = RewardPool(reward_cfg)
    yield pool
    pool.shutdown()


def make_batch(num_prompts: int, samples_per_prompt: int, delay_s: float = 0.0):
    """Rollouts whose text is right for even sample indices; items keyed by prompt id."""
    items = {
        f"p{p}": {"id": f"p{p}", "reward_model": {"ground_truth": str(p)}, "delay_s": delay_s}
        for p in range(num_prompts)
    }
    rollouts = [
        Rollout(
            prompt_id=f"p{p}",
            sample_index=s,
            prompt_ids=[1, 2],
            completion_ids=[3],
            behaviour_logprobs=[-0.5],
            policy_version=0,
            finish_reason="stop",
            text=str(p) if s % 2 == 0 else f"{p}{s}",
        )
        for p in range(num_prompts)
        for s in range(samples_per_prompt)
    ]
    return rollouts, items


def assert_scored_in_order(rollouts, scored):
    assert [s.rollout.sample_id for s in scored] == [r.sample_id for r in rollouts]
    for s in scored:
        assert s.grader_error is None, s.grader_error
        assert s.reward == float(s.rollout.sample_index % 2 == 0)
        assert s.components == {"length": float(len(s.rollout.text))}


def test_pool_scores_a_batch_in_order(pool):
    rollouts, items = make_batch(num_prompts=5, samples_per_prompt=4)
    assert len(pool.actors) == 2
    for actor in pool.actors:  # graders run sandboxed, not in the actor
        assert "no network (empty network namespace)" in ray.get(actor.protections.remote())
    assert_scored_in_order(rollouts, pool.score(rollouts, items))
    assert pool.score([], items) == []
    with pytest.raises(KeyError, match="p9"):
        pool.score(make_batch(10, 1)[0], items)


def test_pool_loses_nothing_when_an_actor_is_killed_mid_batch(pool):
    rollouts, items = make_batch(num_prompts=4, samples_per_prompt=2, delay_s=0.25)
    victim = pool.actors[0]
    outcome = {}
    scoring = threading.Thread(target=lambda: outcome.update(scored=pool.score(rollouts, items)))
    scoring.start()
    ray.kill(victim)
    assert scoring.is_alive(), "the batch finished before the kill: the test proves nothing"
    scoring.join(timeout=120)
    assert not scoring.is_alive()
    assert_scored_in_order(rollouts, outcome["scored"])
    with pytest.raises(RayActorError):
        ray.get(victim.protections.remote())
    assert pool.actors[0] is not victim  # replaced, and the replacement works
    assert_scored_in_order(rollouts[:2], pool.score(rollouts[:2], items))


def test_score_locally_without_ray(reward_cfg):
    rollouts, items = make_batch(num_prompts=2, samples_per_prompt=3)
    assert_scored_in_order(rollouts, score_locally(reward_cfg, rollouts, items))
