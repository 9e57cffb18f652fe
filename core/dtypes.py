"""`model.dtype: auto`: each process picks the dtype its own device computes fast.

bfloat16 where the hardware has it: a CUDA GPU that supports it, an x86 CPU with AVX-512 BF16 or
AMX. Elsewhere float32: without those instructions bf16 is emulated, and on an AVX2-only 2-core
box (2026-12-02) a bf16 linear layer took 6x the float32 time, vLLM-CPU fell back from oneDNN,
and the demo job's first step had not finished after 10 minutes. Resolved where the model is
loaded (learner rank, rollout worker, teacher, server), since on a cluster they differ.
"""

from __future__ import annotations

import re
from pathlib import Path

CPU_BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (Linux /proc/cpuinfo flags; False elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return CPU_BF16_FLAGS.search(cpuinfo) is not None


def resolve_dtype(name: str, device: str | None = None) -> str:
    """ "bfloat16" or "float32": `name` itself unless it is "auto". `device` is "cuda" or "cpu";
    None = where this process computes (CUDA when it sees a GPU)."""
    if name != "auto":
        return name
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"
