"""Which prompts a step takes from the data order (`PromptOrder`): past those the online
difficulty filter skips (`data.difficulty_filter`), plus the extra ones dynamic sampling adds to
a step short of groups with signal (`algorithm.min_signal_groups`).

Every rule is a pure function of the seed, the data cursor and the recorded history, and the
driver state saves the cursor (every prompt taken so far), the prompts already taken for steps
not trained yet (submitted ahead) and the filter's history: a resumed run takes the same prompts
for the same steps, and a step replayed from the scored-rollout stream moves the cursor past the
extra prompts it took as the first run did.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from reward_workers.interface import ScoredRollout
from services.config import DifficultyFilterConfig, JobConfig
from services.orchestrator.batch import groups_of, is_flat
from services.orchestrator.checkpoints import DriverState
from services.orchestrator.data import PromptOrder


@dataclass
class StepPrompts:
    """The prompts taken from the data order for one step, in the order taken."""

    items: list[int] = field(default_factory=list)  # dataset indices: the step's own, then extras
    extra: int = 0  # of `items`, added by dynamic sampling
    skipped: int = 0  # drawn but skipped by the difficulty filter (not in `items`)
    complete: bool = False  # all taken: the step's rollouts are scored and in the stream


def extra_prompts_wanted(min_signal: int, budget_left: int, signal: int, groups: int) -> int:
    """How many more prompts a step with `signal` of its `groups` carrying signal takes next: as
    many as its signal rate so far says it needs for `min_signal` (Laplace-smoothed, so a step
    without any signal yet asks for plenty), within what the bound leaves."""
    missing = min_signal - signal
    if missing <= 0 or budget_left <= 0:
        return 0
    return min(budget_left, math.ceil(missing * (groups + 2) / (signal + 1)))


class DifficultyFilter:
    """A prompt whose last `visits` groups were all flat is skipped with `skip_probability` each
    time the data order reaches it. The draw is seeded by (seed, cursor position), so a rerun
    skips the same ones; a skip leaves the history as it is, and a visit with signal clears it."""

    def __init__(self, config: DifficultyFilterConfig, seed: int):
        self.visits, self.skip_probability, self.seed = config.visits, config.skip_probability, seed
        self.flat_streaks: dict[str, int] = {}  # item id -> its last visits in a row that were flat

    def skips(self, item_id: str, position: int) -> bool:
        if self.flat_streaks.get(item_id, 0) < self.visits:
            return False
        return random.Random(f"{self.seed}/difficulty/{position}").random() < self.skip_probability

    def record(self, scored: list[ScoredRollout], samples_per_prompt: int) -> None:
        """A step's groups, in a fixed order (not the order they finished in)."""
        for (item_id, _), members in sorted(groups_of(scored, samples_per_prompt).items()):
            if is_flat(members):
                self.flat_streaks[item_id] = min(self.flat_streaks.get(item_id, 0) + 1, self.visits)
            else:
                self.flat_streaks.pop(item_id, None)


class PromptSource:
    """The prompts of each step not checkpointed yet, taken through the filter."""

    def __init__(self, cfg: JobConfig, train_items: list[dict]):
        self.cfg, self.item_ids = cfg, [item["id"] for item in train_items]
        self.order = PromptOrder(len(train_items), cfg.seed)
        config = cfg.data.difficulty_filter
        self.filter = DifficultyFilter(config, cfg.seed) if config is not None else None
        self.steps: dict[int, StepPrompts] = {}

    def resume(self, state: DriverState) -> None:
        """Continue from a checkpoint's driver state."""
        self.order.cursor = state.data_cursor
        self.steps = {int(step): StepPrompts(**taken) for step, taken in state.pending_prompts.items()}
        self.rewind(state)

    def rewind(self, state: DriverState) -> None:
        """Back to a checkpoint's filter history (a restarted learner replays the steps after it;
        the prompts already taken stand)."""
        if self.filter is not None:
            self.filter.flat_streaks = dict(state.flat_streaks)

    def save(self, state: DriverState) -> None:
        """Into the driver state of `state.step` steps done: what `resume` continues from."""
        state.data_cursor = self.order.cursor
        state.pending_prompts = {
            str(step): asdict(taken) for step, taken in self.steps.items() if step >= state.step
        }
        state.flat_streaks = dict(self.filter.flat_streaks) if self.filter is not None else {}

    def for_step(self, step: int) -> StepPrompts:
        """The step's own `prompts_per_step` prompts: taken now, or before (a resumed run's)."""
        if step not in self.steps:
            self.steps[step] = StepPrompts()
            self._take(self.steps[step], self.cfg.prompts_per_step)
        return self.steps[step]

    def take_extra(self, step: int, scored: list[ScoredRollout]) -> int:
        """Dynamic sampling: append the extra prompts the step wants, seeing its groups so far;
        returns how many (0: signal enough, the bound reached, or dynamic sampling off)."""
        algorithm, taken = self.cfg.algorithm, self.steps[step]
        if algorithm.min_signal_groups is None:
            return 0
        groups = groups_of(scored, self.cfg.rollout.samples_per_prompt).values()
        signal = sum(not is_flat(members) for members in groups)
        budget_left = algorithm.max_extra_prompts - taken.extra
        wanted = extra_prompts_wanted(algorithm.min_signal_groups, budget_left, signal, len(groups))
        self._take(taken, wanted, extra=True)
        return wanted

    def complete(self, step: int, scored: list[ScoredRollout]) -> StepPrompts:
        """Every rollout of the step is scored. A step a resumed run replays from the stream takes
        again the extra prompts its rollouts show (the same ones: same cursor, same history)."""
        taken = self.steps[step]
        if not taken.complete:
            groups = len(groups_of(scored, self.cfg.rollout.samples_per_prompt))
            self._take(taken, groups - len(taken.items), extra=True)
            taken.complete = True
        return taken

    def record(self, scored: list[ScoredRollout]) -> None:
        """A trained step's groups into the filter's history (steps in order)."""
        if self.filter is not None:
            self.filter.record(scored, self.cfg.rollout.samples_per_prompt)

    def forget(self, before_step: int) -> None:
        """Steps in a checkpoint are never replayed."""
        self.steps = {step: taken for step, taken in self.steps.items() if step >= before_step}

    def _take(self, taken: StepPrompts, count: int, extra: bool = False) -> None:
        """Append the next `count` prompts the filter lets through."""
        taken.extra += count if extra else 0
        while count > 0:
            position = self.order.cursor
            [index] = self.order.take(1)
            if self.filter is not None and self.filter.skips(self.item_ids[index], position):
                taken.skipped += 1
                continue
            taken.items.append(index)
            count -= 1
