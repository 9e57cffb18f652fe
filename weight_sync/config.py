"""The weight-sync channel's config section (`sync`), and the shape of the adapter it carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from core.config import Section


class SyncConfig(Section):
    # object_store: one Ray object, any machine; broadcast: a torch.distributed group of the learner
    # and the workers (nccl on GPUs, gloo on CPU); file: versioned directories the workers read.
    transport: Literal["object_store", "broadcast", "file"] = "object_store"
    # lora: the adapter tensors; full: every weight (the adapter merged in), in buckets of bucket_mb.
    # With learner.lora false it is full whenever not given (lora is then an error).
    payload: Literal["lora", "full"] = "lora"
    bucket_mb: int = Field(default=256, ge=1)
    broadcast_timeout_s: float = Field(
        default=600, gt=0, description="a broadcast waits this long for every rank"
    )
    file_dir: str | None = Field(
        default=None,
        description="file transport: a directory every worker can read "
        "(default: a temporary directory, one machine)",
    )
    max_refetches: int = Field(default=2, ge=0, description="re-fetches of a refused version per worker")
    # How many policy versions a rollout may lag when trained: 0 = synchronous on-policy; k = the
    # next k steps generate while a step trains.
    max_staleness: int = Field(default=1, ge=0)


@dataclass(frozen=True)
class LoraShape:
    """What fixes a LoRA adapter's tensors and scaling: the learner trains this, every rollout
    engine refuses an adapter of another shape."""

    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    dropout: float = 0.0

    def peft_kwargs(self) -> dict[str, Any]:
        """The arguments of peft's `LoraConfig` for a causal LM with this adapter."""
        return dict(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )
