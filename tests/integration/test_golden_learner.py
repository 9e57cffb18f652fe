"""Golden numbers: two learner steps of the tiny seeded model give the values recorded before the
layer refactor (like torchtune's pinned losses). A change to the loss, the log-probs, the LoRA
set-up, the optimizer or its config shows here as a number, not as a vague training regression.

Recorded with the pre-refactor code by the same procedure as `run_two_steps` below (fp32, one
CPU thread); rerun it and replace GOLDEN only for a change meant to alter the numbers, and say so
in the commit.
"""

from __future__ import annotations

import pytest
import torch

from learner.interface import TrainBatch
from learner.learner import Learner
from services.config import JobConfig
from tests.conftest import build_tiny_model
from tests.integration.test_learner import TEMPERATURE, make_samples

ADVANTAGES = [1.0, -1.0, 0.5, -0.5]

# The loss is fixed by the advantages and the completion lengths alone: on-policy (behaviour
# log-probs from the learner's own scores) the importance ratio is exactly 1, so the loss is
# -sum(A_i * len_i) / sum(len_i) = -(5 - 7 + 4.5 - 5.5) / 32 = 0.09375 for lengths 5, 7, 9, 11, on
# both steps, and mismatch_kl is 0. grad_norm, entropy and the adapter's abs sum carry the check.
GOLDEN = [
    {
        "loss": 0.09375,
        "grad_norm": 1.3598295450210571,
        "entropy": 10.75065803527832,
        "mismatch_kl": 0.0,
        "adapter_abs_sum": 842.8359317779541,
    },
    {
        "loss": 0.09375,
        "grad_norm": 1.4766409397125244,
        "entropy": 10.749996185302734,
        "mismatch_kl": 0.0,
        "adapter_abs_sum": 900.078761100769,
    },
]
# fp32 on CPU: bit-for-bit on this machine (also with 2 threads), but another CPU, BLAS build or
# thread count may reduce sums in another order and move the last few bits. 1e-5 relative is
# far above that noise and well below what a change to the training math moves these by.
REL = 1e-5
ABS_ZERO = 1e-7  # for the values that are 0 (relative tolerance is meaningless there)


@pytest.fixture
def one_thread():
    """One intra-op thread for this test only (the recording used one); other tests in this pytest
    process get their thread count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_two_steps(model_dir) -> list[dict[str, float]]:
    cfg = JobConfig(
        data={"train": "unused.jsonl"},
        reward={"grader": {"source": "unused.py"}},
        model={"dtype": "float32"},
        # The split the golden values were recorded with (before token budgets).
        learner={"learning_rate": 1e-2, "micro_batch_size": 2, "max_tokens_per_micro_batch": None},
        seed=0,
    )
    learner = Learner(str(model_dir), **cfg.learner_kwargs())
    recorded = []
    for step in (0, 1):
        samples = make_samples(ADVANTAGES, seed=step)
        for sample, logprobs in zip(samples, learner.score(samples, TEMPERATURE)):
            sample.behaviour_logprobs = logprobs
        stats = learner.train_step(TrainBatch(step=step, samples=samples, temperature=TEMPERATURE))
        assert not stats.skipped
        adapter = learner.export_adapter().tensors.values()
        recorded.append(
            {
                "loss": stats.loss,
                "grad_norm": stats.grad_norm,
                "entropy": stats.entropy,
                "mismatch_kl": stats.mismatch_kl,
                "adapter_abs_sum": sum(t.abs().sum().item() for t in adapter),
            }
        )
    return recorded


def test_two_steps_match_the_recorded_numbers(tmp_path, one_thread):
    # built here, not the session's tiny_model_dir: the recording built it with seed 0 right before
    model_dir = build_tiny_model(tmp_path / "tiny-llama", seed=0)
    recorded = run_two_steps(model_dir)
    for step, (got, want) in enumerate(zip(recorded, GOLDEN)):
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=REL, abs=ABS_ZERO if value == 0 else 0), (
                f"step {step} {name}: {got[name]!r}, recorded {value!r} (all of step {step}: {got})"
            )
