"""model.dtype auto: bf16 only where the device has it in hardware (core/dtypes.py)."""

from __future__ import annotations

import pytest
import torch

from core.dtypes import cpu_has_bf16, resolve_dtype
from services.config import JobConfig

AVX2_ONLY = "flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2\n"
AVX512_NO_BF16 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_bf16_needs_the_bf16_instructions():
    assert not cpu_has_bf16(AVX2_ONLY)
    assert not cpu_has_bf16(AVX512_NO_BF16)  # bf16 emulated there too
    assert cpu_has_bf16(SAPPHIRE_RAPIDS)
    assert cpu_has_bf16("flags\t\t: avx2 amx_bf16\n")


@pytest.mark.parametrize("name", ["bfloat16", "float32"])
def test_a_named_dtype_is_kept_on_every_device(name):
    assert resolve_dtype(name, "cpu") == resolve_dtype(name, "cuda") == name


def test_auto_on_this_cpu_follows_its_flags():
    expected = "bfloat16" if cpu_has_bf16() else "float32"
    assert resolve_dtype("auto", "cpu") == expected
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") == expected  # no GPU: this process computes on the CPU


def test_jobs_default_to_auto():
    cfg = JobConfig.model_validate({"data": {"train": "t.jsonl"}, "reward": {"grader": {"source": "g.py"}}})
    assert cfg.model.dtype == "auto" and cfg.engine_spec("m").dtype == "auto"
    assert cfg.learner_kwargs()["dtype"] == "auto"
