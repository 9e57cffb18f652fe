"""Full-weight training (`learner.lora: false`): the learner trains every weight with DeepSpeed,
exports them as FullWeights that both engines serve with the learner's log-probs, checkpoints and
restores them with the optimizer, and writes a whole model directory as the job's output."""

from __future__ import annotations

import importlib.util
import json

import pytest
import ray
import torch
from safetensors.torch import load_file

from core.config import ConfigError
from learner.interface import TrainBatch, TrainSample
from learner.learner import Learner
from rollout_workers.engines import make_engine
from rollout_workers.interface import SamplingSettings
from services.config import dump_config, load_config
from tests.integration.test_e2e import rft, write_job
from tests.integration.test_learner import (
    TEMPERATURE,
    hf_logprobs,
    job_config,
    make_samples,
    max_abs_diff,
    on_policy,
    trained_one_step,
)
from tests.integration.test_transports import BF16_GAP
from tests.integration.test_weight_sync import mean_abs_gap
from tests.unit.test_config_data import write_config
from weight_sync.full_weights import FullWeights, full_weight_shapes

PROMPTS = [[1, 2 + i, 30 + i] for i in range(4)]
SAMPLING = SamplingSettings(TEMPERATURE, max_new_tokens=12, seed=3)
ENGINES = [
    "hf",
    pytest.param(
        "vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
        ],
    ),
]


def full_config(**settings):
    return job_config(lora=False, **settings)


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A full-weight learner with a KL term (so it holds a frozen base copy), after one step; and
    its weights before it."""
    learner = Learner(str(tiny_model_dir), **full_config(kl_coef=0.01).learner_kwargs())
    base = learner.export_full_weights()
    samples = on_policy(learner, make_samples([1.0, -1.0, 0.5]))
    stats = learner.train_step(TrainBatch(step=0, samples=samples, temperature=TEMPERATURE))
    assert not stats.skipped and stats.policy_version == 1
    return learner, base, samples


def score_gap(learner: Learner, completions) -> float:
    """Mean |engine - learner| log-prob per token of the engine's completions of PROMPTS."""
    samples = [
        TrainSample(f"s{i}", prompt, c.completion_ids, c.behaviour_logprobs, 0.0, 0)
        for i, (prompt, c) in enumerate(zip(PROMPTS, completions))
    ]
    return mean_abs_gap(completions, learner.score(samples, TEMPERATURE))


def test_every_weight_trains_and_exports_under_checkpoint_names(trained, tiny_model_dir):
    learner, base, _ = trained
    weights = learner.export_full_weights()
    assert isinstance(weights, FullWeights) and weights.version == learner.policy_version >= 1
    weights.check(full_weight_shapes(tiny_model_dir))  # checksum, names and shapes the engines expect
    on_disk = load_file(str(tiny_model_dir / "model.safetensors"))
    assert weights.tensors.keys() == on_disk.keys()  # the tied lm_head once, as in the checkpoint
    assert all(torch.equal(base.tensors[name], on_disk[name]) for name in on_disk)
    assert all(not torch.equal(weights.tensors[name], on_disk[name]) for name in on_disk)  # norms too
    with pytest.raises(ValueError, match="learner.lora is false.*no adapter"):
        learner.export_adapter()


def test_reference_is_a_frozen_base_copy_only_with_a_kl_term(trained, tiny_model_dir):
    learner, base, samples = trained
    assert all(not p.requires_grad for p in learner.reference.parameters())
    reference = {name: p for name, p in learner.reference.named_parameters()}
    assert all(torch.equal(reference[name], tensor) for name, tensor in base.tensors.items())
    assert (
        Learner(str(tiny_model_dir), **full_config().learner_kwargs()).reference is None
    )  # kl_coef = 0: no copy
    # The policy moved away from π_ref: the KL term is live (first step: π = π_ref, so 0 there).
    stats = learner.train_step(TrainBatch(step=1, samples=samples, temperature=TEMPERATURE))
    assert not stats.skipped and stats.kl_ref > 0


# In a process of its own (max_calls=1), as in a job: vLLM run in this process would join the
# learner's torch.distributed group and destroy it when the engine goes away.
@ray.remote(max_calls=1)
def generate_before_and_after_load(engine_name: str, model_dir, cfg, weights: FullWeights):
    """The engine's completions of PROMPTS on the base model, then after loading `weights`."""
    engine = make_engine(cfg.rollout, cfg.engine_spec(model_dir))
    before = engine.generate(PROMPTS, SAMPLING)
    engine.load_full_weights(weights)
    return before, engine.generate(PROMPTS, SAMPLING)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ENGINES)
def test_engines_serve_the_trained_weights(local_ray, trained, tiny_model_dir, engine_name):
    learner, _, _ = trained
    before, after = ray.get(
        generate_before_and_after_load.remote(
            engine_name, tiny_model_dir, full_config(), learner.export_full_weights()
        )
    )
    base_gap, synced_gap = score_gap(learner, before), score_gap(learner, after)
    # The base policy is far from the trained one; after the load the engine samples the learner's.
    assert base_gap > 5 * synced_gap and synced_gap < BF16_GAP, (base_gap, synced_gap)


def test_checkpoint_restores_weights_and_optimizer(tiny_model_dir, tmp_path):
    original, samples, batch = trained_one_step(full_config(), tiny_model_dir)
    original.save_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "adapter").exists()  # the weights are in the engine's state

    restored = Learner(str(tiny_model_dir), **full_config().learner_kwargs())
    restored.load_checkpoint(tmp_path / "ckpt")
    assert restored.policy_version == original.policy_version == 1
    assert restored.export_full_weights().sha256 == original.export_full_weights().sha256
    # Adam's moments came back too: a second step (its update depends on them) agrees.
    original.train_step(batch)
    restored.train_step(batch)
    assert restored.export_full_weights().sha256 == original.export_full_weights().sha256


def test_output_is_a_model_directory_that_loads_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner, _, samples = trained
    directory = learner.save_policy(tmp_path / "model")
    assert directory == tmp_path / "model" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert AutoTokenizer.from_pretrained(directory).encode("2 + 2 =") == AutoTokenizer.from_pretrained(
        learner.model_path
    ).encode("2 + 2 =")
    # The same weights and computation as the learner's (measured: identical).
    assert max_abs_diff(learner.score(samples, TEMPERATURE), hf_logprobs(model, samples)) < 1e-4


def test_lora_off_makes_the_payload_full_and_refuses_an_explicit_lora_payload(tmp_path):
    (tmp_path / "lora").mkdir()
    assert load_config(write_config(tmp_path / "lora")).sync.payload == "lora"  # LoRA: unchanged default
    config = write_config(tmp_path, "learner:\n  lora: false\n")
    cfg = load_config(config)
    assert cfg.sync.payload == "full"
    assert load_config(config, ["sync.payload=full"]).sync.payload == "full"
    with pytest.raises(ConfigError, match=r"learner\.lora=false .* sync\.payload=lora"):
        load_config(config, ["sync.payload=lora"])
    # The config a run saves (and --resume reads) states the payload and loads again.
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved).sync.payload == "full"


@pytest.mark.slow
def test_job_with_lora_off_writes_a_model_and_resumes(tmp_path, tiny_model_dir):
    """`rft run -o learner.lora=false` end to end (HF engine, 2 steps), `--resume` for a third,
    then `rft eval --model` on the model directory it wrote."""
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    out = rft("run", str(config), "-o", "learner.lora=false", "-o", "algorithm.kl_coef=0.01")
    run_dir = tmp_path / "runs" / "e2e"
    assert f"model: {run_dir / 'model'}" in out.stdout and not (run_dir / "adapter").exists()
    rft("run", "--resume", str(run_dir), "-o", "steps=3")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == str(run_dir / "model") and summary["steps"] == summary["policy_version"] == 3
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    # Every matrix moved; a norm weight (1.0 in bf16, whose spacing there is 2^-7) moves only in the
    # fp32 master copy at the default learning rate 1e-4.
    assert saved.keys() == base.keys() and all(
        not torch.equal(saved[n], base[n]) for n in base if "norm" not in n
    )
    result = rft(
        "eval",
        "--model",
        str(run_dir / "model"),
        "--data",
        str(tmp_path / "heldout.jsonl"),
        "--grader",
        str(tmp_path / "grader.py"),
        "--engine",
        "hf",
        "--max-new-tokens",
        "4",
    )
    assert '"count": 2' in result.stdout
