"""The terminal view of a run: one progress bar with the numbers a user watches."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_SHOWN = [
    ("stage", "stage", "{:.0f}"),
    ("reward_mean", "reward", "{:.3f}"),
    ("heldout_accuracy", "held-out", "{:.3f}"),
    ("policy_version", "v", "{:.0f}"),
    ("rollout_tokens_per_second", "tok/s", "{:.0f}"),
    ("learner_step_seconds", "learn s", "{:.1f}"),
    ("zero_signal_groups", "flat groups", "{:.0f}"),
    ("extra_prompts", "extra prompts", "{:.0f}"),  # with dynamic sampling
    ("filter_skipped_prompts", "skipped prompts", "{:.0f}"),  # with the difficulty filter
]


class StepProgress:
    def __init__(self, total_steps: int, completed: int):
        console = Console()
        self._progress = Progress(
            TextColumn("[bold]steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            # A file or pipe gets the step lines only: a bar cannot redraw there.
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task("", total=total_steps, completed=completed)
        self._latest: dict[str, float] = {}

    def __enter__(self) -> "StepProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, values: dict[str, float]) -> None:
        self._latest.update({k: v for k, v in values.items() if v is not None})
        shown = [
            f"{label} {fmt.format(self._latest[key])}" for key, label, fmt in _SHOWN if key in self._latest
        ]
        self._progress.update(self._task, advance=1, description="  ".join(shown))
        # A line per step too, so logs (CI, `rft logs`) keep the history the bar overwrites.
        # soft_wrap: never cut the line at the console's width (80 columns when not a terminal).
        self._progress.console.print(
            f"step {int(values.get('step', 0))}: " + "  ".join(shown),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )

    def rewind(self, completed: int) -> None:
        """Back to `completed` steps (the run was rolled back to a checkpoint)."""
        self._progress.update(self._task, completed=completed)
