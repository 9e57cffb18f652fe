"""Rollout-worker throughput vs the raw inference engine, measured in one run.

Same model (the embedded SmolLM2-135M-Instruct unless --model), same prompts, same seeded
sampling: (a) the engine called directly in this process, (b) the same engine inside a
RolloutWorker Ray actor reached through the RolloutScheduler, as a job uses it; the two take
turns, so that changes in the machine's speed during the run fall on both alike. Completion
lengths differ between the two only by sampling noise, so tokens/s is the figure compared.
Goal: worker / raw >= 0.95.

    .venv/bin/python bench/bench_rollout.py [--engine vllm|hf] [--prompts 16] [--samples 4] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from bench.common import rollout_bench_parser

    parser = rollout_bench_parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from services.orchestrator.setup import actor_env

    # One process computes at a time here (the raw engine, then the worker): give each the same threads.
    for name, value in actor_env(heavy_actors=1).items():
        os.environ.setdefault(name, value)

    import ray
    from transformers import AutoTokenizer

    from core.model_store import resolve_model_path
    from rollout_workers.engines import make_engine
    from rollout_workers.interface import GenerationRequest, SamplingSettings
    from services.config import load_config
    from services.orchestrator.data import load_items, prompt_token_ids
    from services.orchestrator.rollout_scheduler import RolloutScheduler
    from services.orchestrator.setup import rollout_worker_factory
    from weight_sync.channel import WeightSyncChannel

    example = Path(__file__).resolve().parents[1] / "examples" / "arithmetic.yaml"
    cfg = load_config(
        example,
        [
            f"rollout.engine={args.engine}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "name=bench-rollout",
        ],
    )
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = load_items(cfg.data.train, cfg.data.fields)[: args.prompts]
    requests = [
        GenerationRequest(item["id"], k, prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens))
        for item in items
        for k in range(args.samples)
    ]

    engine = make_engine(cfg.rollout, cfg.engine_spec(model_path))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": actor_env(heavy_actors=1)})
    scheduler = RolloutScheduler(rollout_worker_factory(cfg, model_path), WeightSyncChannel(), num_workers=1)

    def raw_engine(sampling) -> int:
        return sum(len(c.completion_ids) for c in engine.generate([r.prompt_ids for r in requests], sampling))

    def through_worker(sampling) -> int:
        scheduler.submit("bench", requests, sampling)
        return sum(len(r.completion_ids) for r in scheduler.collect("bench"))

    # Alternate the two (A B B A ...) with the same seeds, so that drift in the machine's speed
    # (other load, thermal) falls on both alike; the first round warms both up.
    rates: dict[str, list[float]] = {"raw": [], "worker": []}
    for repeat in range(args.repeats + 1):
        sampling = SamplingSettings(cfg.rollout.temperature, args.max_new_tokens, seed=repeat)
        order = [("raw", raw_engine), ("worker", through_worker)]
        for name, generate in order if repeat % 2 else order[::-1]:
            started = time.perf_counter()
            tokens = generate(sampling)
            if repeat:
                rates[name].append(tokens / (time.perf_counter() - started))
    scheduler.shutdown()
    ray.shutdown()
    raw, worker = (statistics.median(rates[name]) for name in ("raw", "worker"))
    print(
        f"engine {engine.name}, {len(requests)} samples x <= {args.max_new_tokens} tokens, "
        f"median of {args.repeats}, alternating"
    )
    print(f"raw engine      {raw:8.1f} tok/s   {[round(r) for r in rates['raw']]}")
    print(f"rollout worker  {worker:8.1f} tok/s   {[round(r) for r in rates['worker']]}")
    print(f"ratio worker/raw {worker / raw:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
