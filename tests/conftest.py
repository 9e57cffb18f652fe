"""Shared fixtures: a tiny randomly initialised Llama model built locally (with the embedded
model's tokenizer, so chat templates and EOS behave as in real jobs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.model_store import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # A random model rarely emits EOS; that is fine (completions stop at max_new_tokens).
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def local_ray():
    """A Ray on this machine for one test module, with the environment the job gives its actors."""
    import ray

    from services.orchestrator.setup import actor_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": actor_env()})
    yield
    ray.shutdown()


@pytest.fixture
def no_unshare(monkeypatch, tmp_path):
    """A PATH without `unshare`, as on a machine that lacks it (the probe result is cached)."""
    from core.sandbox import namespaces

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    namespaces.namespace_problem.cache_clear()
    yield
    namespaces.namespace_problem.cache_clear()


def worker_settings(cfg, model_dir) -> tuple:
    """RolloutWorker's settings arguments for a job config: (rollout section, engine spec)."""
    return cfg.rollout, cfg.engine_spec(model_dir)
