"""Learner throughput on 1 vs 2 data-parallel ranks, measured in one run on the embedded
SmolLM2-135M model.

    .venv/bin/python bench/bench_learner_group.py [--repeats 3] [--samples 64] [--zero-stage 2]

For each rank count, starts Ray and a `LearnerGroup` (the job's LoRA r16 on q/k/v/o, bf16,
DeepSpeed ZeRO on gloo), with the cores shared out as a job shares them (`actor_env`: one rank
gets every core's thread, two ranks half each). Each repeat trains one step on the same
demo-shaped batch (samples of 40-100 prompt and 8-64 completion tokens, mixed), after one
warm-up step. Prints the median step time and completion tokens/s per rank count, and
`learner tokens/s ratio 2 ranks/1 rank: X`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mixed_batch(samples: int, vocab: int):
    """Demo-like lengths: prompts 40-100 tokens, completions 8-64 (a fixed pseudo-random mix)."""
    import torch

    from learner.interface import TrainBatch, TrainSample

    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(samples):
        prompt_len = int(torch.randint(40, 101, (1,), generator=generator))
        completion_len = int(torch.randint(8, 65, (1,), generator=generator))
        rows.append(
            TrainSample(
                f"s{i}",
                torch.randint(10, vocab, (prompt_len,), generator=generator).tolist(),
                torch.randint(10, vocab, (completion_len,), generator=generator).tolist(),
                [-2.0] * completion_len,
                1.0 if i % 2 else -1.0,
                0,
            )
        )
    return TrainBatch(0, rows, temperature=0.7)


def measure(model_path: str, num_ranks: int, args) -> tuple[list[float], int]:
    """Step times (seconds) of a group of `num_ranks` ranks on the batch, after a warm-up step,
    and the batch's completion tokens."""
    import ray
    from transformers import AutoConfig

    from learner.group import LearnerGroup
    from services.config import JobConfig
    from services.orchestrator.setup import actor_env

    cfg = JobConfig(
        data={"train": "unused.jsonl"},
        reward={"grader": {"source": "unused.py"}},
        learner={"num_ranks": num_ranks, "zero_stage": args.zero_stage, "micro_batch_size": 16},
    )
    batch = mixed_batch(args.samples, AutoConfig.from_pretrained(model_path).vocab_size)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": actor_env(heavy_actors=num_ranks)},
    )
    group = LearnerGroup(model_path, cfg.learner, cfg.learner_kwargs(), name=f"bench-{num_ranks}")
    try:
        group.train_step(batch)  # warm-up: first-step allocations, gloo connections
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            group.train_step(batch)
            times.append(time.perf_counter() - started)
        return times, sum(len(s.completion_ids) for s in batch.samples)
    finally:
        group.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64, help="samples in the batch")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    args = parser.parse_args()

    from core.model_store import ensure_default_model

    model_path = str(ensure_default_model())
    rate = {}
    for num_ranks in (1, 2):
        times, tokens = measure(model_path, num_ranks, args)
        median = statistics.median(times)
        rate[num_ranks] = tokens / median
        print(
            f"{num_ranks} rank(s): step {median:.2f} s median of {[round(t, 2) for t in times]}, "
            f"{rate[num_ranks]:.0f} completion tokens/s",
            flush=True,
        )
    print(f"cores: {os.cpu_count()}, batch: {args.samples} samples, {tokens} completion tokens")
    print(f"learner tokens/s ratio 2 ranks/1 rank: {rate[2] / rate[1]:.2f}")


if __name__ == "__main__":
    main()
