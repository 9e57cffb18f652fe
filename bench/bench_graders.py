"""Grading cost: the sandbox's per-sample overhead, and reward-pool throughput vs worker count.

One run measures, on the same batch of samples with a trivial grader (string equality):
(a) unsandboxed: the grade function built by the grader library and called in this process;
(b) sandboxed: the same grader in a reward_workers.sandbox.GraderSandbox (a warm runner in its
    own namespaces that forks a child per sample), started and warmed up before timing;
    goal: (b) - (a) <= 5 ms per sample;
(c) a RewardPool of 1, 2 and 4 reward-worker Ray actors (a fresh local Ray) scoring the batch:
    samples/s, and the ratio to 1 worker. Each actor runs its own sandbox, so the ratios are
    bounded by the machine's cores (printed).

    .venv/bin/python bench/bench_graders.py [--samples 400] [--repeats 3] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRIVIAL_GRADER = """
def grade(sample, item):
    return float(sample["output_text"].strip() == item["reward_model"]["ground_truth"])
"""
GOAL_OVERHEAD_MS = 5.0


def make_batch(count: int):
    """Rollouts and items keyed by prompt id: half right, half wrong, 8 samples per prompt."""
    from rollout_workers.interface import Rollout

    items = {
        f"p{p}": {"id": f"p{p}", "reward_model": {"ground_truth": str(p)}} for p in range((count + 7) // 8)
    }
    rollouts = [
        Rollout(
            prompt_id=f"p{i // 8}",
            sample_index=i % 8,
            prompt_ids=[1],
            completion_ids=[2],
            behaviour_logprobs=[-0.1],
            policy_version=0,
            finish_reason="stop",
            text=str(i // 8) if i % 2 == 0 else "wrong",
        )
        for i in range(count)
    ]
    return rollouts, items


def best_of(repeats: int, run) -> float:
    """The fastest of `repeats` timed runs (seconds): the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    import ray

    from reward_workers.config import RewardConfig
    from reward_workers.grader_spec import PythonGrader
    from reward_workers.graders import build_grader
    from reward_workers.pool import RewardPool, grader_sample
    from reward_workers.sandbox import GraderSandbox, runner_spec

    cores = os.cpu_count()
    reward_cfg = RewardConfig(grader=PythonGrader(source=TRIVIAL_GRADER, name="trivial"))
    rollouts, items_by_id = make_batch(args.samples)
    samples = [grader_sample(r) for r in rollouts]
    items = [items_by_id[r.prompt_id] for r in rollouts]
    n = len(samples)
    print(
        f"this box has {cores} cores (os.cpu_count()), load average {os.getloadavg()[0]:.1f} at start; "
        f"{n} samples, best of {args.repeats} runs each"
    )

    grade = build_grader(runner_spec(reward_cfg.grader))
    unsandboxed_s = best_of(args.repeats, lambda: [grade(s, i) for s, i in zip(samples, items)])
    with GraderSandbox(reward_cfg.grader, reward_cfg) as sandbox:
        warm = sandbox.grade(samples[:20], items[:20])
        if any(result.error for result in warm):
            raise SystemExit(f"the sandbox failed to grade: {next(r.error for r in warm if r.error)}")
        sandboxed_s = best_of(args.repeats, lambda: sandbox.grade(samples, items))
        protections = sandbox.protections
    overhead_ms = 1000 * (sandboxed_s - unsandboxed_s) / n
    print("per-sample grading, trivial grader:")
    print(f"  unsandboxed (in-process call)      {1000 * unsandboxed_s / n:8.3f} ms")
    print(
        f"  sandboxed (GraderSandbox, 1 runner) {1000 * sandboxed_s / n:8.3f} ms   ({', '.join(protections)})"
    )
    print(
        f"  overhead                            {overhead_ms:8.3f} ms per sample "
        f"(goal <= {GOAL_OVERHEAD_MS:g} ms: {'met' if overhead_ms <= GOAL_OVERHEAD_MS else 'NOT met'})"
    )

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        rates = {}
        for workers in args.workers:
            pool = RewardPool(reward_cfg, num_workers=workers)
            try:
                scored = pool.score(rollouts[:32], items_by_id)  # warm-up: every actor's first call
                errors = [s.grader_error for s in scored if s.grader_error]
                if errors:
                    raise SystemExit(f"the pool failed to grade: {errors[0]}")
                rates[workers] = n / best_of(
                    args.repeats, lambda pool=pool: pool.score(rollouts, items_by_id)
                )
            finally:
                pool.shutdown()
    finally:
        ray.shutdown()
    print(f"reward pool throughput, {n} samples per batch ({cores} cores):")
    base = rates.get(1)
    for workers, rate in rates.items():
        ratio = f"{rate / base:5.2f}x vs 1 worker" if base else ""
        print(f"  {workers} worker{'s' if workers > 1 else ' '}  {rate:8.1f} samples/s  {ratio}")


if __name__ == "__main__":
    main()
