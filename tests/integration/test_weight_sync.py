"""After a sync, a rollout worker samples from the learner's policy: its behaviour log-probs
match the learner's own log-probs of the same tokens (both engines, real Ray actors)."""

from __future__ import annotations

import importlib.util

import pytest
import ray

from learner.interface import TrainBatch, TrainSample
from learner.learner import Learner
from rollout_workers.interface import GenerationRequest, SamplingSettings
from rollout_workers.worker import RolloutWorker
from services.config import load_config
from tests.conftest import worker_settings
from tests.unit.test_config_data import EXAMPLE
from weight_sync.channel import WeightSyncChannel

pytestmark = pytest.mark.slow
ENGINES = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
SAMPLING = SamplingSettings(temperature=0.8, max_new_tokens=12)


def mean_abs_gap(rollouts, learner_logprobs) -> float:
    gaps = [abs(a - b) for r, lp in zip(rollouts, learner_logprobs) for a, b in zip(r.behaviour_logprobs, lp)]
    return sum(gaps) / len(gaps)


def as_samples(rollouts, advantages):
    return [
        TrainSample(r.sample_id, r.prompt_ids, r.completion_ids, r.behaviour_logprobs, a, r.policy_version)
        for r, a in zip(rollouts, advantages)
    ]


def job_config(tiny_model_dir, engine: str = "hf"):
    """A small LoRA with a large learning rate, so one step visibly moves the policy."""
    return load_config(
        EXAMPLE,
        [
            f"model.path={tiny_model_dir}",
            f"rollout.engine={engine}",
            "learner.lora_rank=4",
            "learner.lora_alpha=8",
            "learner.learning_rate=0.05",
            "learner.micro_batch_size=8",
        ],
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_logprobs_match_learner_after_sync(local_ray, tiny_model_dir, engine):
    cfg = job_config(tiny_model_dir, engine)
    learner = ray.remote(Learner).remote(str(tiny_model_dir), **cfg.learner_kwargs())
    worker = ray.remote(RolloutWorker).remote("w0", *worker_settings(cfg, tiny_model_dir))
    requests = [GenerationRequest(f"p{i}", k, [1, 2 + i, 30 + i]) for i in range(4) for k in range(2)]

    before = ray.get(worker.generate.remote(requests, SAMPLING))
    base_gap = mean_abs_gap(
        before, ray.get(learner.score.remote(as_samples(before, [0] * 8), SAMPLING.temperature))
    )
    stats = ray.get(
        learner.train_step.remote(TrainBatch(0, as_samples(before, [1, -1] * 4), SAMPLING.temperature))
    )
    assert stats.policy_version == 1 and not stats.skipped
    trained_gap = mean_abs_gap(
        before, ray.get(learner.score.remote(as_samples(before, [0] * 8), SAMPLING.temperature))
    )

    channel = WeightSyncChannel()
    sync = channel.publish(1, learner.export_adapter.remote(), [worker])
    assert sync.version == 1 and ray.get(worker.policy_version.remote()) == 1
    # What the driver exports: per-worker latency, and how long generation was held up.
    assert 0 < sync.pause_seconds["w0"] <= sync.worker_seconds["w0"] <= sync.seconds
    after = ray.get(worker.generate.remote(requests, SAMPLING))
    assert all(r.policy_version == 1 for r in after)
    synced_gap = mean_abs_gap(
        after, ray.get(learner.score.remote(as_samples(after, [0] * 8), SAMPLING.temperature))
    )

    # The step moved the learner away from what the worker sampled with; the sync closes the gap.
    assert trained_gap > 5 * max(base_gap, synced_gap), (base_gap, trained_gap, synced_gap)
    assert synced_gap < 0.03, synced_gap  # bf16 numerics on both sides
    ray.kill(worker)
    ray.kill(learner)
