"""What the learner writes to disk: its checkpoints (DeepSpeed engine state + policy version)
and the job's output policy when it trains full weights (a Hugging Face model directory).

Both are written to a staging directory next to the target, then renamed into place, so a crash
mid-write leaves the previous copy usable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

ENGINE_TAG = "engine"  # DeepSpeed checkpoint tag inside a checkpoint directory
WORLD_FILE = "learner_world.json"  # how many ranks wrote the checkpoint (none: one, before groups)

# Besides config.json and the weights, what a model directory needs to load and generate as the
# source model did: tokenizer files of every common kind, chat template, generation settings.
MODEL_SIDE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "generation_config.json",
)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written directory into place; the old one is removed only afterwards."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(directory: str | Path) -> Iterator[Path]:
    """A fresh directory next to `directory` to write into; renamed to `directory` on success."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class CheckpointWorldError(ValueError):
    """A checkpoint written by a different number of learner ranks than the group loading it."""


def write_engine_checkpoint(
    engine,
    directory: str | Path,
    policy_version: int,
    world_size: int,
    exclude_frozen: bool,
    extra: Callable[[Path], object] | None = None,
) -> None:
    """The engine's module and optimizer state (incl. fp32 master weights, every ZeRO stage:
    each rank writes its own partition) and the policy version into `directory`; then
    `extra(directory)` on every rank. `exclude_frozen` leaves out frozen weights (a LoRA's base:
    the model directory's), except a tied output embedding DeepSpeed's filter misses (+56 MB for
    SmolLM2-135M, restored unchanged). Collective: every rank of the group calls it."""
    directory = Path(directory)
    engine.save_checkpoint(
        str(directory),
        tag=ENGINE_TAG,
        save_latest=False,
        client_state={"policy_version": policy_version},
        exclude_frozen_parameters=exclude_frozen,
    )
    if extra is not None:
        extra(directory)
    if torch.distributed.get_rank() == 0:
        (directory / WORLD_FILE).write_text(json.dumps({"num_ranks": world_size}))


def check_checkpoint_world(directory: str | Path, num_ranks: int) -> None:
    """Raise CheckpointWorldError unless `directory` was written by `num_ranks` learner ranks."""
    directory = Path(directory)
    if not (directory / ENGINE_TAG).is_dir():
        raise FileNotFoundError(f"{directory} is not a learner checkpoint (no {ENGINE_TAG}/)")
    world_file = directory / WORLD_FILE
    written_by = json.loads(world_file.read_text())["num_ranks"] if world_file.is_file() else 1
    if written_by != num_ranks:
        raise CheckpointWorldError(
            f"{directory} was written by {written_by} learner rank(s); this job has learner.num_ranks="
            f"{num_ranks}. ZeRO keeps each rank's share of the optimizer state (and under ZeRO-3 of the "
            f"weights) in that rank's own file, so it resumes only on {written_by} rank(s): resume with "
            f"learner.num_ranks={written_by}. The trained adapter alone is in {directory / 'adapter'}."
        )


def load_engine_checkpoint(engine, directory: str | Path, world_size: int, strict: bool) -> int:
    """Restore what `write_engine_checkpoint` wrote into `engine`; returns the policy version.
    `strict`: the checkpoint must hold every weight of the module (full-weight training)."""
    check_checkpoint_world(directory, world_size)
    _, client_state = engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=strict)
    return int(client_state["policy_version"])


def save_model_directory(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], source_dir: str | Path, directory: str | Path
) -> Path:
    """`model`'s config with `tensors` (checkpoint names) as a Hugging Face model directory, with
    the tokenizer and generation files of `source_dir` copied: it loads with
    `AutoModelForCausalLM.from_pretrained`, vLLM and `rft eval --model` like the source model."""
    with staged(directory) as staging:
        model.save_pretrained(staging, state_dict=tensors)
        copy_model_side_files(source_dir, staging)
    return Path(directory)


def copy_model_side_files(source_dir: str | Path, directory: Path) -> None:
    """The tokenizer, chat template and generation files of `source_dir` (MODEL_SIDE_FILES)."""
    for pattern in MODEL_SIDE_FILES:
        for path in Path(source_dir).glob(pattern):
            if path.is_file():
                shutil.copy2(path, directory / path.name)
