"""What the reward workers return for each rollout."""

from __future__ import annotations

from dataclasses import dataclass, field

from rollout_workers.interface import Rollout


@dataclass
class ScoredRollout:
    rollout: Rollout
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    grader_error: str | None = None  # why the grader failed (then reward is 0)
    hack_flags: list[str] = field(default_factory=list)  # anti-hacking probes that fired (reward 0)
    diagnostics: list[str] = field(default_factory=list)  # e.g. failing test names and stack traces

    def grading_record(self) -> dict:
        """The sample and how it was graded, as JSON-able data (samples.jsonl, `rft eval/grade`);
        an episode's record also has its turns (messages, each model turn's policy version)."""
        record = {
            "sample_id": self.rollout.sample_id,
            "text": self.rollout.text,
            "reward": self.reward,
            "components": self.components,
            "grader_error": self.grader_error,
            "hack_flags": self.hack_flags,
            "diagnostics": self.diagnostics,
        }
        if self.rollout.turns is not None:
            record["finish_reason"] = self.rollout.finish_reason
            record["turns"] = self.rollout.turns
        return record
