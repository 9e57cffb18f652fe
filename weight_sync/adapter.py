"""The unit of weight sync: one versioned, checksummed LoRA adapter."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


class WeightsRefused(ValueError):
    """A worker refused a published version and kept serving its current weights."""


class WeightsIntegrityError(WeightsRefused):
    """Weights (an adapter or full weights) whose tensors do not match the checksum they were
    published with."""


def check_shapes(what: str, tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """Refuse tensors that do not cover exactly the expected names with the expected shapes."""
    wrong = sorted(
        name
        for name in shapes.keys() | tensors.keys()
        if name not in shapes or name not in tensors or tensors[name].shape != shapes[name]
    )
    if wrong:
        raise ValueError(
            f"{what}: {len(wrong)} tensors missing, unexpected or of another shape, e.g. {wrong[:3]}"
        )


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class AdapterWeights:
    """LoRA tensors named as peft's `get_peft_model_state_dict` names them (no adapter name),
    the `LoraConfig` as a dict, the policy version they define, and a sha256 over the tensors."""

    version: int
    tensors: dict[str, torch.Tensor]
    peft_config: dict[str, Any]
    sha256: str = field(default="")

    @classmethod
    def create(
        cls, version: int, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]
    ) -> "AdapterWeights":
        # A copy: the published version must not change while the learner keeps training.
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        return cls(version=version, tensors=cpu, peft_config=peft_config, sha256=checksum(cpu))

    def verify(self) -> None:
        actual = checksum(self.tensors)
        if actual != self.sha256:
            raise WeightsIntegrityError(
                f"adapter version {self.version}: checksum {actual[:12]} != published {self.sha256[:12]}"
            )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter in peft format (loadable by peft and by vLLM `--lora-modules`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            self.tensors,
            str(directory / "adapter_model.safetensors"),
            metadata={"format": "pt", "policy_version": str(self.version), "sha256": self.sha256},
        )
        (directory / "adapter_config.json").write_text(json.dumps(self.peft_config, indent=2, default=list))
        return directory

    def merged_into(self, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base model's weights with this adapter folded in: W + (alpha / r) * B @ A for every
        LoRA-targeted module, in W's dtype; the other tensors are passed through unchanged. Keys
        are the base checkpoint's names (peft's `base_model.model.` prefix removed)."""
        scale = self.peft_config["lora_alpha"] / self.peft_config["r"]
        merged = dict(base_weights)
        for name, lora_a in self.tensors.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = self.tensors[name.replace(".lora_A.", ".lora_B.")]
            weight = base_weights[f"{module}.weight"]
            # fp32 for the update, one rounding at the end: what the learner's bf16 model computes
            # as W x + s B (A x) differs from this only by that rounding.
            delta = scale * (lora_b.float() @ lora_a.float())
            merged[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
        return merged

    @classmethod
    def load_pretrained(cls, directory: str | Path, version: int = 1) -> "AdapterWeights":
        """Read a peft-format adapter directory (as written by `save_pretrained` or peft)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
        if not (weights.is_file() and config.is_file()):
            raise FileNotFoundError(
                f"{directory} is not a peft adapter (needs adapter_model.safetensors and adapter_config.json)"
            )
        return cls.create(version, load_file(str(weights)), json.loads(config.read_text()))
