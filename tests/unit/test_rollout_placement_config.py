"""The rollout section's GPU/cluster fields: custom resources per worker and vLLM's GPU memory
share, from YAML and `-o` overrides, and the share's way into the vLLM engine (vLLM itself is
replaced by a stand-in: tests/unit loads no engine)."""

from __future__ import annotations

import sys
import types

import pytest

from core.config import ConfigError
from rollout_workers.config import EngineSpec, RolloutConfig
from rollout_workers.engines import make_engine
from services.config import load_config
from tests.unit.test_config_data import write_config
from weight_sync.config import LoraShape


def test_defaults_leave_single_machine_jobs_unchanged():
    rollout = RolloutConfig()
    assert rollout.resources == {} and rollout.vllm_gpu_memory_utilization == 0.9


def test_dict_and_share_overrides_parse_as_yaml(tmp_path):
    cfg = load_config(
        write_config(tmp_path),
        ["rollout.resources={rollout_node: 0.5}", "rollout.vllm_gpu_memory_utilization=0.4"],
    )
    assert cfg.rollout.resources == {"rollout_node": 0.5}
    assert cfg.rollout.vllm_gpu_memory_utilization == 0.4


@pytest.mark.parametrize("share", ["0", "1.5", "-0.1"])
def test_memory_share_outside_0_1_is_named(tmp_path, share):
    with pytest.raises(ConfigError, match=r"rollout\.vllm_gpu_memory_utilization"):
        load_config(write_config(tmp_path), [f"rollout.vllm_gpu_memory_utilization={share}"])


def test_resources_must_be_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.resources\.rollout_node"):
        load_config(write_config(tmp_path), ["rollout.resources={rollout_node: many}"])


def test_make_engine_hands_the_memory_share_to_the_vllm_engine(monkeypatch):
    built = {}

    class StandInVLLMEngine:
        def __init__(self, *args, **kwargs):
            built.update(kwargs)

    fake = types.ModuleType("rollout_workers.vllm_engine")
    fake.VLLMEngine = StandInVLLMEngine
    monkeypatch.setitem(sys.modules, "rollout_workers.vllm_engine", fake)
    spec = EngineSpec(
        "model-dir", "bfloat16", LoraShape(rank=16, alpha=32, target_modules=("q_proj",)), max_model_len=128
    )
    engine = make_engine(RolloutConfig(engine="vllm", vllm_gpu_memory_utilization=0.35), spec)
    assert isinstance(engine, StandInVLLMEngine)
    assert built["gpu_memory_utilization"] == 0.35
