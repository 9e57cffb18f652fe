"""How a learner process joins its torch.distributed world (DeepSpeed's process group)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from core.net import free_port
from learner.config import LearnerConfig


@dataclass(frozen=True)
class WorldSpec:
    """This process's place in a learner group: rank `rank` of `world_size`, meeting at rank 0's
    address (found by the group through Ray, on a free port)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    timeout_s: float  # of every collective: a peer that hangs fails this rank instead of blocking it


def init_distributed(world: WorldSpec | None) -> Any:
    """Import deepspeed for this machine and join the world; returns the deepspeed module.

    Without a WorldSpec a launcher (torchrun, the deepspeed CLI) may have set RANK/WORLD_SIZE/
    MASTER_*; else this process is rank 0 of 1 on a free loopback port.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is imported
    if world is not None:
        # LOCAL_RANK 0: Ray gives each rank its own GPUs, visible from index 0.
        os.environ.update(
            RANK=str(world.rank),
            WORLD_SIZE=str(world.world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=world.master_addr,
            MASTER_PORT=str(world.master_port),
        )
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not torch.distributed.is_initialized():
        # Alone: a fresh port every time. A MASTER_PORT inherited from a parent process (Ray
        # workers inherit the driver's environment) may be held by that parent's own group.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world is None:
        deepspeed.init_distributed(dist_backend=backend)
    else:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=world.timeout_s))
    return deepspeed


def deepspeed_config(learner: LearnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed engine's config for a learner rank."""
    # gradient_accumulation_steps stays 1: batches vary in size, so train_step marks the
    # last micro-batch as the accumulation boundary itself, and steps once per batch.
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        # torch_adam: no fused-Adam JIT build (~65 s on CPU); for a few MB of LoRA weights it
        # would not pay, and full weights train with the same optimizer.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learner.learning_rate,
                "weight_decay": learner.weight_decay,
                "torch_adam": True,
            },
        },
    }
