"""The other unit of weight sync: every weight of the model, versioned and checksummed.

What a full-weight sync sends (`sync.payload: full`): the learner's current policy as plain
checkpoint tensors (for a LoRA learner, the base weights with the adapter merged in). Names are
the model's own `named_parameters()` names with peft's wrapping removed; a tied output
embedding appears once, under its first name, exactly as in the checkpoint file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import WeightsIntegrityError, check_shapes, checksum


@dataclass
class FullWeights:
    version: int
    tensors: dict[str, torch.Tensor]
    sha256: str = field(default="")

    @classmethod
    def create(cls, version: int, tensors: dict[str, torch.Tensor]) -> "FullWeights":
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        return cls(version=version, tensors=cpu, sha256=checksum(cpu))

    def verify(self) -> None:
        actual = checksum(self.tensors)
        if actual != self.sha256:
            raise WeightsIntegrityError(
                f"full weights version {self.version}: checksum {actual[:12]} != published {self.sha256[:12]}"
            )

    def check(self, shapes: dict[str, torch.Size]) -> None:
        """Refuse, before touching served weights, tensors that fail their checksum or do not
        cover exactly the model's parameters with their shapes."""
        self.verify()
        check_shapes(f"full weights version {self.version}", self.tensors, shapes)


def base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's own parameters under checkpoint names, also when it is wrapped by peft: LoRA
    tensors left out, `.base_layer` removed, shared (tied) parameters once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        name.replace(".base_layer.", "."): param
        for name, param in base.named_parameters()
        if ".lora_" not in name
    }


def full_weight_shapes(model_path: str | Path) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a full-weight sync carries for this model (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return {name: param.shape for name, param in base_parameters(model).items()}


def plan_buckets(specs: list[tuple[str, torch.dtype, int]], max_bytes: int) -> list[list[str]]:
    """Group tensor names into buckets of one dtype each and at most `max_bytes` (a larger tensor
    gets a bucket of its own). `specs` = (name, dtype, nbytes); the order is by dtype, then name,
    so sender and receivers derive the same buckets from the same tensors."""
    buckets: list[list[str]] = []
    current_dtype, current_bytes = None, 0
    for name, dtype, nbytes in sorted(specs, key=lambda s: (str(s[1]), s[0])):
        if not buckets or dtype != current_dtype or current_bytes + nbytes > max_bytes:
            buckets.append([])
            current_dtype, current_bytes = dtype, 0
        buckets[-1].append(name)
        current_bytes += nbytes
    return buckets
