"""Held-out evaluation: greedy completions, graded, summarised. Shared by `rft run` and `rft eval`."""

from __future__ import annotations

from collections import defaultdict

from reward_workers.interface import ScoredRollout
from rollout_workers.interface import GenerationRequest, SamplingSettings

# An item counts as solved when its grader gives (nearly) full reward.
SOLVED_REWARD = 1.0 - 1e-6


def greedy_settings(max_new_tokens: int) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)


def eval_requests(
    items: list[dict], prompt_ids: dict[str, list[int]], episodes: bool = False
) -> list[GenerationRequest]:
    """One greedy request per item; with `episodes` each carries its item (the environment's reset)."""
    return [
        GenerationRequest(item["id"], 0, prompt_ids[item["id"]], item if episodes else None) for item in items
    ]


def summarize(scored: list[ScoredRollout]) -> dict[str, float]:
    """accuracy (share solved), reward_mean, grader error share and the mean of each component."""
    n = len(scored)
    if n == 0:
        return {"accuracy": 0.0, "reward_mean": 0.0, "grader_error_rate": 0.0, "count": 0}
    component_sums: dict[str, float] = defaultdict(float)
    for s in scored:
        for name, value in s.components.items():
            component_sums[name] += value
    summary = {
        "accuracy": sum(s.reward >= SOLVED_REWARD for s in scored) / n,
        "reward_mean": sum(s.reward for s in scored) / n,
        "grader_error_rate": sum(s.grader_error is not None for s in scored) / n,
        "count": n,
    }
    summary.update({f"component_{name}": total / n for name, total in sorted(component_sums.items())})
    episodes = [s.rollout.turns for s in scored if s.rollout.turns is not None]
    if episodes:  # multi-turn: how the model used the environment
        summary["tool_calls_per_episode"] = sum(_tool_calls(t) for t in episodes) / len(episodes)
        summary["turns_per_episode"] = sum(_model_turns(t) for t in episodes) / len(episodes)
    return summary


def heldout_metrics(summary: dict[str, float]) -> dict[str, float]:
    """What metrics.jsonl (and Prometheus) keep of a held-out evaluation."""
    keys = ("accuracy", "reward_mean", "tool_calls_per_episode", "turns_per_episode")
    return {f"heldout_{key}": summary[key] for key in keys if key in summary}


def _tool_calls(turns: list[dict]) -> int:
    return sum(turn["role"] == "tool" for turn in turns)


def _model_turns(turns: list[dict]) -> int:
    return sum(turn["role"] == "assistant" and "policy_version" in turn for turn in turns)


def format_summary(summary: dict[str, float]) -> str:
    parts = [f"accuracy {summary['accuracy']:.3f}", f"mean reward {summary['reward_mean']:.3f}"]
    parts += [
        f"{k.removeprefix('component_')} {v:.3f}" for k, v in summary.items() if k.startswith("component_")
    ]
    if "tool_calls_per_episode" in summary:
        parts.append(f"tool calls/episode {summary['tool_calls_per_episode']:.2f}")
    parts.append(f"grader errors {summary['grader_error_rate']:.3f}")
    return f"n={summary['count']}: " + ", ".join(parts)
