"""Multi-turn episode throughput vs single-turn generation, measured in one run.

The calculator-agent showcase (examples/calculator_agent.yaml: the embedded SmolLM2-135M-Instruct,
the sandboxed `tools` environment) in one rollout worker: (a) episodes -- every turn a request
of the engine's running batch, the tool called in the sandbox between turns, observations
appended as ids; (b) the same first-turn contexts generated single-turn, one completion each,
with a token budget of the mean policy tokens of an episode (measured in a warm-up round of
episodes), so both sample about the same number of tokens. The two take turns (A B B A ...)
with the same seeds, so drift in the machine's speed falls on both alike. Compared: policy
tokens/s (tokens the model sampled; an episode's observation tokens are prefilled, not sampled)
and episodes/s vs completions/s.

    .venv/bin/python bench/bench_episodes.py [--engine vllm|hf] [--prompts 16] [--samples 4] [--repeats 3]
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

    args = rollout_bench_parser(__doc__).parse_args()
    from services.orchestrator.setup import actor_env

    for name, value in actor_env(heavy_actors=1).items():  # one process computes here
        os.environ.setdefault(name, value)

    from core.model_store import resolve_model_path
    from rollout_workers.engine_loop import END
    from rollout_workers.episodes import item_messages
    from rollout_workers.interface import GenerationRequest, SamplingSettings
    from rollout_workers.worker import RolloutWorker
    from services.config import load_config
    from services.orchestrator.data import load_items

    example = Path(__file__).resolve().parents[1] / "examples" / "calculator_agent.yaml"
    cfg = load_config(example, [f"rollout.engine={args.engine}", "name=bench-episodes"])
    model_path = resolve_model_path(args.model)
    worker = RolloutWorker("bench", cfg.rollout, cfg.engine_spec(model_path))
    items = load_items(cfg.data.train)[: args.prompts]
    renderer = worker.episodes.renderer
    episodes = [GenerationRequest(item["id"], k, [], item) for item in items for k in range(args.samples)]
    # The episode's first context (tools in the system message as the episode shows them), single-turn.
    single = [
        GenerationRequest(item["id"], k, renderer.prompt_ids(item_messages(item)), item)
        for item in items
        for k in range(args.samples)
    ]

    def run_episodes(seed: int) -> tuple[int, int]:
        rollouts = worker.generate(
            episodes, SamplingSettings(cfg.rollout.temperature, cfg.rollout.max_new_tokens, seed)
        )
        return sum(sum(r.loss_mask) for r in rollouts), len(rollouts)

    def run_single_turn(seed: int) -> tuple[int, int]:
        sampling = SamplingSettings(cfg.rollout.temperature, single_budget, seed)
        batch = worker.loop.submit(single, sampling, 0, None)  # no episode: one completion each
        finished = []
        while (group := batch.groups.get()) is not END:
            finished.extend(group)
        return sum(len(completion.completion_ids) for _, completion, _ in finished), len(finished)

    policy_tokens, count = run_episodes(seed=args.repeats + 1)  # warm-up: an episode's mean tokens
    single_budget = max(1, round(policy_tokens / count))
    rates = measure({"episodes": run_episodes, "single-turn": run_single_turn}, args.repeats)
    worker.close()
    report(rates, worker.engine_name(), len(episodes), cfg, single_budget)


def measure(runs: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """tokens/s and sequences/s of each run, alternating; the first round warms both up."""
    rates = {name: {"tokens": [], "sequences": [], "tokens_total": []} for name in runs}
    order = list(runs.items())
    for repeat in range(repeats + 1):
        for name, run in order if repeat % 2 else order[::-1]:
            started = time.perf_counter()
            tokens, sequences = run(repeat)
            seconds = time.perf_counter() - started
            if repeat:
                rates[name]["tokens"].append(tokens / seconds)
                rates[name]["sequences"].append(sequences / seconds)
                rates[name]["tokens_total"].append(tokens)
    return rates


def report(rates: dict, engine: str, samples: int, cfg, single_budget: int) -> None:
    median = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rates.items()}
    episode, single = median["episodes"], median["single-turn"]
    turns, per_turn = cfg.rollout.max_turns, cfg.rollout.max_new_tokens
    print(
        f"engine {engine}, {samples} episodes (<= {turns} turns x {per_turn} tokens) "
        f"vs {samples} single-turn completions (<= {single_budget} tokens), median of "
        f"{len(rates['episodes']['tokens'])}, alternating"
    )
    for name, label in (("episodes", "episodes/s"), ("single-turn", "completions/s")):
        run = median[name]
        print(
            f"{name:12s} {run['tokens']:8.1f} policy tok/s  {run['sequences']:6.2f} {label}  "
            f"policy tokens per run {run['tokens_total']:.0f}"
        )
    print(f"policy tokens/s ratio episodes/single-turn: {episode['tokens'] / single['tokens']:.2f}")
    print(f"sequences/s ratio episodes/single-turn: {episode['sequences'] / single['sequences']:.2f}")


if __name__ == "__main__":
    main()
