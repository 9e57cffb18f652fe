"""Held-out evaluation: greedy completions, graded, summarised. Shared by `rft run` and `rft eval`;
`HeldoutEvaluator` runs it on a job's own workers."""

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
    kept = [key for key in summary if key in keys or key.startswith("component_")]  # format, lenient, ...
    return {f"heldout_{key}": summary[key] for key in kept}


def heldout_sets_metrics(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """metrics.jsonl's numbers of the eval.extra_heldout sets: `heldout_<set>_<metric>`."""
    return {
        f"heldout_{name}_{key.removeprefix('heldout_')}": value
        for name, summary in summaries.items()
        for key, value in heldout_metrics(summary).items()
    }


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


class HeldoutEvaluator:
    """A job's held-out sets (data.heldout, eval.extra_heldout) evaluated greedily on its own
    rollout and reward workers."""

    def __init__(self, cfg, inputs, actors):
        self.cfg, self.inputs, self.actors = cfg, inputs, actors

    def evaluate(self, items: list[dict] | None = None) -> dict[str, float]:
        """Greedy completions of `items` (default data.heldout's), graded: accuracy, reward, components."""
        sampling = greedy_settings(self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens)
        requests = eval_requests(
            self.inputs.heldout_items if items is None else items,
            self.inputs.prompt_ids,
            episodes=bool(self.cfg.rollout.environment),
        )
        self.actors.rollouts.submit("eval", requests, sampling)
        rollouts = self.actors.rollouts.collect("eval")
        return summarize(self.actors.reward_pool.score(rollouts, self.inputs.items_by_id))

    def extra_sets(self, when: str) -> dict[str, dict[str, float]]:
        """Each eval.extra_heldout set, evaluated and printed."""
        summaries = {}
        for name, items in self.inputs.extra_heldout.items():
            summaries[name] = self.evaluate(items)
            print(f"held-out {name} {when}: {format_summary(summaries[name])}", flush=True)
        return summaries


def format_comparison(name: str, base: dict[str, float], final: dict[str, float]) -> str:
    """One line: accuracy, then every grader component (format, lenient accuracy, ...), base -> final."""
    gain = 100 * (final["accuracy"] - base["accuracy"])
    line = (
        f"{name} accuracy: base {base['accuracy']:.3f} -> final {final['accuracy']:.3f} "
        f"({gain:+.1f} points, n={final['count']})"
    )
    components = sorted(k for k in final if k.startswith("component_") and k in base)
    parts = [f"{k.removeprefix('component_')} {base[k]:.3f} -> {final[k]:.3f}" for k in components]
    return line + ("; " + ", ".join(parts) if parts else "")
