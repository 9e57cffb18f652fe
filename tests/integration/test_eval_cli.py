"""`rft eval`: accuracy and mean reward of a model (+ adapter) on any dataset in the job format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from weight_sync.adapter import AdapterWeights

pytestmark = pytest.mark.slow
GRADER = (
    "def grade(sample, item):\n"
    "    chars = len(sample['output_text'])\n"
    "    return {'reward': float(chars > 0), 'components': {'chars': chars}}\n"
)


def rft_eval(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "eval", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[: result.stdout.rindex("}") + 1])


def test_eval_base_and_adapter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"{i} plus {i} is"}) + "\n" for i in range(5))
    )
    grader = tmp_path / "grader.py"
    grader.write_text(GRADER)
    common = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--grader",
        str(grader),
        "--engine",
        "hf",
        "--max-new-tokens",
        "6",
    ]
    base = rft_eval(*common, "--output", str(tmp_path / "base.jsonl"))
    assert base["count"] == 5 and base["adapter"] is None
    assert 0.0 <= base["accuracy"] <= 1.0 and "component_chars" in base
    assert len((tmp_path / "base.jsonl").read_text().splitlines()) == 5

    # A non-trivial adapter changes what the model writes.
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 2.0)
    config = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    AdapterWeights.create(1, get_peft_model_state_dict(model), config).save_pretrained(tmp_path / "adapter")
    tuned = rft_eval(
        *common, "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "tuned.jsonl")
    )
    assert tuned["adapter"] == str(tmp_path / "adapter")
    texts = lambda name: [json.loads(line)["text"] for line in (tmp_path / name).read_text().splitlines()]
    assert texts("base.jsonl") != texts("tuned.jsonl")


def test_eval_names_a_missing_grader(tmp_path, tiny_model_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "x.jsonl"),
            "--grader",
            str(tmp_path / "nope.py"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "nope.py not found" in result.stderr
