"""Checkpoints of a run: `runs/<job>/checkpoints/step_N/` = the learner's state (adapter,
optimizer, version) + the driver's state (step, data cursor, prompts taken ahead, version, base
held-out score, the difficulty filter's history).

Written to a staging directory and renamed, so a crash mid-write leaves the previous checkpoint
usable; the last `checkpoint.keep_last` are kept. The data order is a pure function of
(seed, cursor), and the difficulty filter draws by (seed, position), so the cursor and the
filter's history are the whole RNG state of the data stream.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from learner.checkpoint import check_checkpoint_world
from services.config import JobConfig

log = logging.getLogger("rft.checkpoints")

DRIVER_STATE = "driver_state.json"


@dataclass
class DriverState:
    """Everything besides the learner's checkpoint needed to continue a run exactly."""

    step: int = 0  # steps completed
    policy_version: int = 0
    data_cursor: int = 0  # prompts taken from the data order, those of `pending_prompts` included
    base_heldout: dict = field(default_factory=dict)
    samples_trained: int = 0
    base_heldout_sets: dict = field(default_factory=dict)  # eval.extra_heldout name -> base summary
    # str(step) -> `selection.StepPrompts` fields: the prompts taken for steps not done yet (submitted
    # ahead), which a resumed run generates or replays again rather than taking new ones.
    pending_prompts: dict = field(default_factory=dict)
    flat_streaks: dict = field(default_factory=dict)  # the difficulty filter's history (selection.py)


def save_checkpoint(cfg: JobConfig, run_dir: Path, learner, state: DriverState) -> Path:
    """Learner state + driver state into checkpoints/step_N, atomically; keep the last K."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-step_{state.step}"
    shutil.rmtree(staging, ignore_errors=True)
    learner.save_checkpoint(staging / "learner")
    (staging / DRIVER_STATE).write_text(json.dumps(state.__dict__, indent=2))
    target = root / f"step_{state.step}"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    for old in sorted(checkpoints(run_dir))[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old[1])
    return target


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if (p / DRIVER_STATE).is_file())


def check_resumable(run_dir: Path, num_ranks: int) -> None:
    """Before anything starts (or the run's config.yaml is rewritten): the newest checkpoint
    exists and was written by `num_ranks` learner ranks."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
    check_checkpoint_world(found[-1][1] / "learner", num_ranks)


def restore(run_dir: Path, learner) -> DriverState:
    """Load the newest checkpoint into the learner and return the driver state saved with it.
    Records in samples.jsonl from steps after it are dropped: those steps are trained again."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
    _, latest = found[-1]
    state = DriverState(**json.loads((latest / DRIVER_STATE).read_text()))
    learner.load_checkpoint(latest / "learner")
    drop_samples_after(run_dir, state.step)
    log.info("resumed from %s (step %d, policy version %d)", latest, state.step, state.policy_version)
    return state


def roll_back(run_dir: Path, learner, current: DriverState) -> DriverState:
    """After the learner group restarted: the newest checkpoint, or with none yet the start of
    the run (the fresh group holds the initial weights; the base model's evaluations stand)."""
    if checkpoints(run_dir):
        return restore(run_dir, learner)
    drop_samples_after(run_dir, 0)
    return DriverState(base_heldout=current.base_heldout, base_heldout_sets=current.base_heldout_sets)


def drop_samples_after(run_dir: Path, step: int) -> None:
    """Keep samples.jsonl's records of steps up to `step` (atomically rewritten)."""
    samples_log = run_dir / "samples.jsonl"
    if not samples_log.is_file():
        return
    kept = [
        line for line in samples_log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step
    ]
    staging = samples_log.with_name(".samples.jsonl.tmp")
    staging.write_text("".join(kept))
    os.replace(staging, samples_log)
